"""``repaint`` against diffusers' ``RePaintScheduler``: step for step where the two conventions coincide, and the two
places where they differ stated as facts about diffusers (which is why ours follows the paper's code instead).

- Without jumps (``jump_n_sample = 1``) both are DDPM ancestral inpainting with the kept region re-noised to the
  level after each step from the step's own noise draw: the same trajectories from the same generator.
- Jumps: both build the same list of integers, but the paper's code reads it as the states the path visits
  (the network evaluated at the state a step leaves), diffusers as the timesteps the network is evaluated at. So
  diffusers' jumps start one level lower than the paper's, the first from the finished sample (level 0). Driven
  along our path, diffusers' ``step`` and ``undo_step`` reproduce ours when T = N.
- ``undo_step`` with T > N noises with betas[t .. t + T/N - 1] where the forward process from the grid point
  below t to t needs betas[t - T/N + 1 .. t]: a jump then lands on the level T/N - 1 timesteps above t.
diffusers computes in float32 and its unknown-region step is the DDIM form of the same posterior (eta = 1; its
default eta = 0 makes the generated region's steps deterministic): agreement to float32 precision.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

from lightning_ddpm import GaussianDiffusion, make_schedule  # noqa: E402
from lightning_ddpm.samplers import RePaintSampler  # noqa: E402
from lightning_ddpm.samplers.repaint import jump_schedule  # noqa: E402


def _setup(T):
    d = GaussianDiffusion(make_schedule("linear", num_timesteps=T), parameterization="eps", variance="fixed_small")
    scheduler = diffusers.RePaintScheduler(
        num_train_timesteps=T, trained_betas=d.betas.float().numpy(), eta=1.0, clip_sample=False
    )
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) * 0.3

    def net(x, t):  # a stand-in eps network that mixes rows and columns, as a U-Net mixes pixels
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return torch.tanh(weight @ x @ weight) * (0.5 + tt / T)

    x0 = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    return d, scheduler, net, x0, mask


@pytest.mark.parametrize(
    ("num_steps", "jump_length", "jump_n_sample"), [(250, 10, 10), (50, 5, 3), (7, 2, 4), (9, 1, 1)]
)
def test_the_schedule_is_diffusers_list_read_as_states(num_steps, jump_length, jump_n_sample):
    scheduler = diffusers.RePaintScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(num_steps, jump_length, jump_n_sample)
    theirs = (scheduler.timesteps // (1000 // num_steps)).tolist()
    levels = jump_schedule(num_steps, jump_length, jump_n_sample)
    assert theirs == [level - 1 for level in levels[:-1]]  # the same integers
    ours = [a - 1 for a, b in zip(levels, levels[1:]) if b < a]  # the network at the state a step leaves
    evaluated = [t for t, before in zip(theirs, [num_steps, *theirs]) if t < before]  # diffusers: at the entry
    assert len(ours) == len(evaluated)
    assert (ours == evaluated) == (jump_n_sample == 1)  # they part at the first jump, one level apart


@pytest.mark.parametrize("num_steps", [50, 10])
def test_without_jumps_repaint_is_diffusers_step_for_step(num_steps):
    T = 50
    d, scheduler, net, x0, mask = _setup(T)
    scheduler.set_timesteps(num_steps, jump_length=1, jump_n_sample=1)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(x0.shape, generator=g)
    for t in scheduler.timesteps.tolist():
        image = scheduler.step(net(image, t), t, image, x0, mask, generator=g).prev_sample
    ours = RePaintSampler(num_steps=num_steps, jump_length=1, jump_n_sample=1).inpaint(
        net, d, x0, mask, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(ours, image, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours[..., :2, :], x0[..., :2, :])


def test_with_jumps_diffusers_moves_along_our_path_are_ours():
    """T = N = 30, jumps of 4 levels three times: each of our moves is diffusers' ``step`` (down) or ``undo_step``
    (up, from state a - 1 to a: betas[a], right when T = N), drawing from one generator in the same order."""
    T = N = 30
    d, scheduler, net, x0, mask = _setup(T)
    scheduler.set_timesteps(N, jump_length=4, jump_n_sample=3)
    g = torch.Generator().manual_seed(2)
    image = torch.randn(x0.shape, generator=g)
    levels = jump_schedule(N, 4, 3)
    for here, there in zip(levels, levels[1:]):
        if there < here:
            image = scheduler.step(net(image, here - 1), here - 1, image, x0, mask, generator=g).prev_sample
        else:
            image = scheduler.undo_step(image, there - 1, generator=g)
    sampler = RePaintSampler(num_steps=N, jump_length=4, jump_n_sample=3)
    ours = sampler.inpaint(net, d, x0, mask, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, image, rtol=1e-4, atol=1e-4)


def test_diffusers_undo_step_lands_above_the_level_when_steps_are_respaced():
    """T = 1000, N = 250 (4 timesteps a level): going up from the grid point t - 4 to t, diffusers multiplies by
    sqrt(1 - beta) over betas[t .. t + 3], the forward process from t - 1 to t + 3; ours uses alpha_bar(t) /
    alpha_bar(t - 4), the forward process between the two grid points."""
    T, N = 1000, 250
    d = GaussianDiffusion(make_schedule("linear", num_timesteps=T))
    scheduler = diffusers.RePaintScheduler(num_train_timesteps=T, trained_betas=d.betas.float().numpy())
    scheduler.set_timesteps(N, 10, 10)
    ab, betas = d.schedule.alphas_cumprod, scheduler.betas
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    for t in (4, 40, 400, 996):
        wanted = 1 - float(ab[t] / ab[t - 4])  # the noise variance from grid point t - 4 to grid point t
        theirs = scheduler.undo_step(x, t, generator=torch.Generator().manual_seed(1))
        replay, expected = torch.Generator().manual_seed(1), x
        for i in range(t, t + 4):  # the betas it uses, with its draws replayed
            expected = (1 - betas[i]) ** 0.5 * expected + betas[i] ** 0.5 * torch.randn(x.shape, generator=replay)
        torch.testing.assert_close(theirs, expected)
        scale = float(torch.prod(1 - betas[t : t + 4].double()))
        assert scale == pytest.approx(float(ab[t + 3] / ab[t - 1]), rel=1e-5)  # from t - 1 to t + 3
        # the variance it adds is too large by 40%, 6.9%, 0.7%, 0.3% at these t (where beta grows fastest, most)
        assert (1 - scale) / wanted - 1 > {4: 0.39, 40: 0.068, 400: 0.007, 996: 0.0029}[t], t
