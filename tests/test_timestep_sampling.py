import pytest
import torch

from lightning_ddpm.timestep_sampling import LossSecondMomentSampler, UniformTimestepSampler, make_timestep_sampler


def test_uniform_sampler_has_unit_weights_and_covers_all_steps():
    s = UniformTimestepSampler(10)
    t, w = s.sample(5000, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(range(10)) and torch.all(w == 1)
    assert torch.bincount(t, minlength=10).min().item() > 400


def test_loss_second_moment_sampler():
    T, history = 4, 3
    s = LossSecondMomentSampler(T, history=history, uniform_prob=0.0)
    assert not s.warmed_up()
    torch.testing.assert_close(s.probabilities(), torch.full((T,), 0.25, dtype=torch.float64))
    losses = {0: [1.0, 1.0, 1.0], 1: [2.0, 2.0, 2.0], 2: [0.0, 0.0, 3.0], 3: [4.0, 4.0, 4.0]}
    for k in range(history):
        s.update(torch.arange(T), torch.tensor([losses[i][k] for i in range(T)]))
    assert s.warmed_up()
    rms = torch.tensor([1.0, 2.0, 3.0 / 3**0.5, 4.0], dtype=torch.float64)  # sqrt(mean(L^2))
    torch.testing.assert_close(s.probabilities(), rms / rms.sum())
    # importance weights make the weighted mean unbiased: E_p[w * L] = mean_t L
    t, w = s.sample(200_000, generator=torch.Generator().manual_seed(1))
    per_t = torch.tensor([1.0, 2.0, 1.0, 4.0])
    assert (w * per_t[t]).mean().item() == pytest.approx(per_t.mean().item(), rel=0.01)
    # FIFO: a new loss pushes out the oldest
    s.update(torch.tensor([2]), torch.tensor([6.0]))
    assert s.loss_history[2].tolist() == [0.0, 3.0, 6.0]
    state = s.state_dict()
    fresh = LossSecondMomentSampler(T, history=history, uniform_prob=0.0)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.probabilities(), s.probabilities())


def test_uniform_mixing_and_errors():
    s = LossSecondMomentSampler(2, history=1, uniform_prob=0.5)
    s.update(torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(s.probabilities(), torch.tensor([0.75, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown timestep_sampler 'importance'; choose one of: uniform, "
                                         "loss_second_moment"):
        make_timestep_sampler("importance", 10)
    with pytest.raises(ValueError, match="uniform_prob"):
        LossSecondMomentSampler(4, uniform_prob=2.0)
