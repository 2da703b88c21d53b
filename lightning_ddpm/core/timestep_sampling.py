"""How training draws timesteps: uniformly, or by importance on the loss (improved-diffusion).

Each sampler returns ``(t, weights)``: weighting each example's loss by ``weights`` keeps
the batch mean an unbiased estimate of the uniform-t objective. Both draw on the device with the
caller's generator and never read values back (no host synchronisation in the training step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dtypes import precise_dtype
from .registry import Registry

__all__ = ["UniformTimestepSampler", "LossSecondMomentSampler", "TIMESTEP_SAMPLERS", "make_timestep_sampler"]


TIMESTEP_SAMPLERS: Registry[type[UniformTimestepSampler]] = Registry("timestep_sampler")


@TIMESTEP_SAMPLERS.register("uniform")
class UniformTimestepSampler:
    """t ~ U{0, ..., T-1}, weight 1."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def probabilities(self) -> Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Uniform sampling ignores the losses."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


@TIMESTEP_SAMPLERS.register("loss_second_moment")
class LossSecondMomentSampler(UniformTimestepSampler):
    """p(t) proportional to sqrt(E[L_t^2]) over the last ``history`` losses of each t.

    Nichol & Dhariwal 2021, sec. 3.3: sampling the VLB terms by importance lowers the
    gradient noise enough to optimise L_vlb directly. Uniform until every t has a full
    history; mixed with ``uniform_prob`` of the uniform distribution afterwards. Under DDP
    the caller gathers (t, losses) from every rank before :meth:`update` so all ranks agree.
    The state lives on the device of the losses it is given; nothing is read back.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history = history
        self.uniform_prob = uniform_prob
        # A ring buffer per t, plus a spare last column that absorbs the writes an update drops.
        self._buffer = torch.zeros(num_timesteps, history + 1, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)  # min(losses seen, history)
        self._next = torch.zeros(num_timesteps, dtype=torch.long)  # the slot to write next (the oldest when full)

    @property
    def loss_history(self) -> Tensor:
        return self._buffer[:, : self.history]

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def _to(self, device: torch.device | str) -> None:
        dtype = precise_dtype(device)  # the loss history in float64 where the device has it
        if self._buffer.device != torch.device(device) or self._buffer.dtype != dtype:
            self._buffer = self._buffer.to(dtype).to(device)  # cast on the host: MPS cannot hold the float64
            self.loss_counts, self._next = self.loss_counts.to(device), self._next.to(device)

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        self._to(device)
        p = self._probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])  # importance weights keep the mean loss unbiased
        return t, weights.float()

    def probabilities(self) -> Tensor:
        return self._probabilities().cpu()

    def _probabilities(self) -> Tensor:
        # Uniform until warmed up, chosen with torch.where on the device rather than an if on the host.
        w = (self.loss_history**2).mean(dim=1).sqrt()
        w = w / w.sum().clamp(min=torch.finfo(w.dtype).tiny)
        p = w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return torch.where((self.loss_counts == self.history).all(), p, torch.full_like(p, 1.0 / self.num_timesteps))

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each finite (t, loss) to t's history, oldest out first, without a loop over the batch."""
        self._to(t.device)
        H = self.history
        t, losses = t.long(), losses.detach().to(self._buffer.dtype)
        keep = torch.isfinite(losses)
        order = torch.argsort(t, stable=True)  # grouped by t, batch order within a group
        t, losses, keep = t[order], losses[order], keep[order]
        kept_before = torch.cumsum(keep.long(), 0) - keep.long()
        k = kept_before - kept_before[torch.searchsorted(t, t)]  # rank among its t's kept losses
        added = torch.zeros_like(self.loss_counts).index_add_(0, t, keep.long())
        # With more than H new losses for one t only its last H are written, each to its own slot;
        # everything else goes to the spare column.
        write = keep & (k >= added[t] - H)
        slot = torch.where(write, (self._next[t] + k) % H, H)
        self._buffer.index_put_((t, slot), torch.where(write, losses, 0.0))
        self._next = (self._next + added) % H
        self.loss_counts = torch.clamp(self.loss_counts + added, max=H)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "loss_history": self.loss_history.cpu().clone(),
            "loss_counts": self.loss_counts.cpu().clone(),
            "next_slot": self._next.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._buffer[:, : self.history] = state["loss_history"].to(self._buffer.device)
        self.loss_counts = state["loss_counts"].to(self.loss_counts.device).clone()
        # Older checkpoints kept each history in order, oldest first: the next slot is count % history.
        self._next = state.get("next_slot", self.loss_counts % self.history).to(self._next.device).clone()


def make_timestep_sampler(name: str, num_timesteps: int) -> UniformTimestepSampler:
    """Build ``uniform`` or ``loss_second_moment``."""
    return TIMESTEP_SAMPLERS.get(name)(num_timesteps)
