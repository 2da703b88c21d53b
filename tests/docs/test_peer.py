"""The peer of the digits ablation (benchmarks/peer.py): its DDIM and this library's trailing DDIM visit the same
grid when the step count divides T and are then the same map from noise to samples, so a gap between their
rows is not the sampler (docs/benchmarks.md, "Recipe ablation")."""

import os

import pytest
import torch

pytest.importorskip("denoising_diffusion_pytorch")

from benchmarks.digits_quality import peer_network  # noqa: E402
from benchmarks.peer import PeerModule, register_peer_unet  # noqa: E402
from lightning_ddpm import DDIMSampler  # noqa: E402

T = 1000


def peer_grid(steps: int) -> list[int]:
    """The timesteps the peer's DDIM evaluates its network at, recorded from a stand-in network."""
    peer = PeerModule(sampling_steps=steps).eval()
    seen: list[int] = []

    def record(x: torch.Tensor, t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    peer.diffusion.model.forward = record  # type: ignore[method-assign]
    peer.sample(1, seed=0)
    return seen


@pytest.mark.parametrize("steps", [1, 7, 10, 50, 61, 125, 333, 999, 1000])
def test_the_peers_ddim_grid_is_the_trailing_grid_to_rounding(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    monkeypatch.setitem(os.environ, "TQDM_DISABLE", "1")
    theirs = peer_grid(steps)
    ours = DDIMSampler(num_steps=steps, spacing="trailing").timesteps(T).tolist()
    assert len(theirs) == len(ours) == steps
    if T % steps == 0:
        assert theirs == ours
    else:  # the peer truncates T - 1 - k T / N where trailing rounds it: a step apart at most
        assert theirs != ours and max(abs(a - b) for a, b in zip(theirs, ours)) == 1


@pytest.mark.parametrize("steps", [1, 10, 50, 125])
def test_the_peers_ddim_is_trailing_ddim_from_the_same_noise(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    monkeypatch.setitem(os.environ, "TQDM_DISABLE", "1")
    register_peer_unet()
    torch.manual_seed(0)
    peer = PeerModule(sampling_steps=steps).eval()  # random weights: the map, not the quality
    ours = peer_network(peer)
    theirs = peer.sample(6, seed=123)  # its noise: torch.randn((6, 1, 8, 8)) after torch.manual_seed(123)
    x_T = torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(123))
    mine = ours.sample(6, sampler=DDIMSampler(num_steps=steps, spacing="trailing"), x_T=x_T)
    assert theirs.abs().mean() > 0.1
    torch.testing.assert_close(mine, theirs, atol=1e-3, rtol=0)
    if steps > 1:
        leading = ours.sample(6, sampler=DDIMSampler(num_steps=steps, spacing="leading"), x_T=x_T)
        assert (leading - theirs).abs().max() > 1e-2  # the leading grid (t = 980 first at 50 steps) is another map
