"""The epoch's loss, overall and per quarter of the timestep range, as one torchmetrics ``Metric``."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["TimestepLosses"]


class TimestepLosses(Metric):
    """Mean loss (and VLB term) over an epoch, and the mean loss in each of ``num_bins`` equal ranges of t.

    improved-diffusion logs the loss by timestep quartile: it shows which noise levels the model
    still gets wrong. Each update adds into one ``(2, num_bins + 2)`` tensor of [sums; counts] on
    the device (one-hot products: deterministic on CUDA, unlike ``bincount`` with weights, and no
    host synchronisation); torchmetrics sums it over ranks once, in :meth:`compute`.
    """

    full_state_update = False

    def __init__(self, num_timesteps: int, num_bins: int = 4) -> None:
        super().__init__()
        self.num_timesteps, self.num_bins = num_timesteps, num_bins
        # columns: the bins, then the batch loss, then the VLB term
        self.add_state("totals", default=torch.zeros(2, num_bins + 2), dist_reduce_fx="sum")

    def update(self, losses: Tensor, t: Tensor, loss: Tensor, vlb: Tensor | None = None) -> None:
        """``losses`` (B,) per example at timesteps ``t`` (B,); ``loss`` the batch's (weighted) loss."""
        # A skipped non-finite step must not turn the epoch's means into NaN: non-finite examples count 0.
        finite = torch.isfinite(losses)
        losses = torch.where(finite, losses.detach(), 0.0).float()
        weights = torch.nn.functional.one_hot((t * self.num_bins) // self.num_timesteps, self.num_bins + 2).float()
        weights = weights * finite[:, None]
        weights[:, self.num_bins] = torch.isfinite(loss).float()  # the batch loss counts once per example
        values = losses[:, None].expand(-1, self.num_bins + 2).clone()
        values[:, self.num_bins] = torch.nan_to_num(loss.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
        if vlb is not None:
            weights[:, self.num_bins + 1] = torch.isfinite(vlb).float()
            values[:, self.num_bins + 1] = torch.nan_to_num(vlb.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
        self.totals += torch.stack([(values * weights).sum(0), weights.sum(0)])

    def compute(self) -> dict[str, Tensor]:
        """``loss``, ``vlb`` (if updated with it) and ``loss_q0``... for the bins that saw examples."""
        sums, counts = self.totals
        means = sums / counts.clamp(min=1)
        seen = (counts > 0).tolist()  # once per epoch, after the sync: reading it back is the point
        names = [f"loss_q{q}" for q in range(self.num_bins)] + ["loss", "vlb"]
        return {name: means[i] for i, name in enumerate(names) if seen[i]}
