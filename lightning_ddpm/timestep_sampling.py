"""How training draws timesteps: uniformly, or by importance on the loss (improved-diffusion).

Each sampler returns ``(t, weights)``: weighting each example's loss by ``weights`` keeps
the batch mean an unbiased estimate of the uniform-t objective.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["UniformTimestepSampler", "LossSecondMomentSampler", "make_timestep_sampler"]


class UniformTimestepSampler:
    """t ~ U{0, ..., T-1}, weight 1."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def probabilities(self) -> Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator)
        return t.to(device), torch.ones(batch_size, device=device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Uniform sampling ignores the losses."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class LossSecondMomentSampler(UniformTimestepSampler):
    """p(t) proportional to sqrt(E[L_t^2]) over the last ``history`` losses of each t.

    Nichol & Dhariwal 2021, sec. 3.3: sampling the VLB terms by importance lowers the
    gradient noise enough to optimise L_vlb directly. Uniform until every t has a full
    history; mixed with ``uniform_prob`` of the uniform distribution afterwards. Under DDP
    the caller gathers (t, losses) from every rank before :meth:`update` so all ranks agree.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        if not self.warmed_up():
            return super().sample(batch_size, device, generator)
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])  # importance weights keep the mean loss unbiased
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def probabilities(self) -> Tensor:
        if not self.warmed_up():
            return super().probabilities()
        w = (self.loss_history**2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: Tensor, losses: Tensor) -> None:
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            n = int(self.loss_counts[ti])
            if n == self.history:
                # Shift out the oldest loss, FIFO.
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:].clone()
                self.loss_history[ti, -1] = li
            else:
                self.loss_history[ti, n] = li
                self.loss_counts[ti] = n + 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.loss_history.copy_(state["loss_history"])
        self.loss_counts.copy_(state["loss_counts"])


_TIMESTEP_SAMPLERS = {"uniform": UniformTimestepSampler, "loss_second_moment": LossSecondMomentSampler}


def make_timestep_sampler(name: str, num_timesteps: int) -> UniformTimestepSampler:
    """Build ``uniform`` or ``loss_second_moment``."""
    if name not in _TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep_sampler {name!r}; choose one of: {', '.join(_TIMESTEP_SAMPLERS)}")
    return _TIMESTEP_SAMPLERS[name](num_timesteps)
