import pytest
import torch

from lightning_ddpm.core.timestep_sampling import LossSecondMomentSampler, UniformTimestepSampler, make_timestep_sampler


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
    # FIFO: a new loss pushes out the oldest (the history is a ring buffer: order within it is free)
    s.update(torch.tensor([2]), torch.tensor([6.0]))
    assert sorted(s.loss_history[2].tolist()) == [0.0, 3.0, 6.0]
    state = s.state_dict()
    fresh = LossSecondMomentSampler(T, history=history, uniform_prob=0.0)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.probabilities(), s.probabilities())


def test_uniform_mixing_and_errors():
    s = LossSecondMomentSampler(2, history=1, uniform_prob=0.5)
    s.update(torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(s.probabilities(), torch.tensor([0.75, 0.25], dtype=torch.float64))
    with pytest.raises(
        ValueError, match="unknown timestep_sampler 'importance'; choose one of: uniform, loss_second_moment"
    ):
        make_timestep_sampler("importance", 10)
    with pytest.raises(ValueError, match="uniform_prob"):
        LossSecondMomentSampler(4, uniform_prob=2.0)


def test_vectorised_update_matches_a_per_example_fifo():
    """Batches with repeated timesteps (more than `history` of one t), NaNs, in any order: each t keeps
    exactly the last `history` finite losses, as a loop over the batch appending one by one would."""
    T, H = 5, 3
    s = LossSecondMomentSampler(T, history=H)
    fifo = {t: [] for t in range(T)}
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = torch.randint(0, T, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
        t[: len(t) // 2] = 1  # many losses for t = 1 in one batch
        losses = torch.rand(len(t), generator=g, dtype=torch.float64)
        losses[torch.rand(len(t), generator=g) < 0.1] = float("nan")
        s.update(t, losses)
        for ti, li in zip(t.tolist(), losses.tolist()):
            if li == li:
                fifo[ti] = (fifo[ti] + [li])[-H:]
        for ti in range(T):
            assert int(s.loss_counts[ti]) == len(fifo[ti])
            assert sorted(
                s.loss_history[ti].tolist()[: len(fifo[ti])] if len(fifo[ti]) < H else s.loss_history[ti].tolist()
            ) == sorted(fifo[ti])
    state = s.state_dict()
    again = LossSecondMomentSampler(T, history=H)
    again.load_state_dict(state)
    s.update(torch.tensor([3, 3]), torch.tensor([7.0, 8.0], dtype=torch.float64))
    again.update(torch.tensor([3, 3]), torch.tensor([7.0, 8.0], dtype=torch.float64))
    torch.testing.assert_close(again.loss_history, s.loss_history)
