"""Skip optimizer steps with NaN/inf gradients without a host-device synchronisation per step.

GradScaler's way: a ``found_inf`` flag computed on the device and handed to an optimizer that
can skip on the device (torch's fused Adam, AdamW and SGD read ``optimizer.found_inf``; the
module makes Adam and AdamW fused by default). The flag comes from the gradients, which DDP has
already averaged, so every rank skips together. The module calls :meth:`NonFiniteGuard.check`, which
reads the counts back, every ``log_every_n_steps`` steps and at the end of fit: a warning reports
the skipped steps and a streak of ``max_in_a_row`` stops training.

Optimizers that cannot skip on the device fall back to :meth:`NonFiniteGuard.host_skip` (one
synchronisation per step). Under 16-mixed, Lightning's GradScaler already skips overflowing
steps (overflow is routine while it calibrates its scale), so the guard counts non-finite
*losses* only and leaves the skipping to it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class NonFiniteGuard:
    """Counts and skips non-finite steps; ``max_in_a_row`` consecutive ones stop training."""

    def __init__(self, max_in_a_row: int) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.on_device = False  # decided at the start of fit from the optimizer and precision
        # [in a row, longest streak, skipped since the last check, last bad step, its t min, its t max]
        self.counts: Tensor | None = None
        self.scaler = False

    def start(self, optimizer: Any, scaler: bool, device: torch.device) -> None:
        """Choose the device path where the optimizer can skip on the device, or a scaler skips."""
        # torch's fused Adam, AdamW and SGD read optimizer.found_inf and skip the step on the device
        self.on_device = scaler or bool(getattr(optimizer, "defaults", {}).get("fused"))
        self.scaler = scaler
        self.counts = torch.zeros(6, dtype=torch.long, device=device)

    def remember(self, loss: Tensor, t: Tensor) -> None:
        """Called in the training step: the loss and timesteps, for the flag and the warning."""
        self._loss, self._t_range = loss.detach(), torch.stack([t.min(), t.max()])

    def before_optimizer_step(self, optimizer: Any, parameters: Iterable[Tensor], step: int) -> None:
        """Flag this step on the device; the optimizer skips it (fused found_inf, or GradScaler).

        ``parameters``: a list (not a generator: walking the modules costs ~0.5 ms a step on a CPU).
        """
        if not self.on_device or self.counts is None:
            return
        if self.scaler:
            bad = ~torch.isfinite(self._loss)
        else:
            grads = [p.grad for p in parameters if p.grad is not None]
            bad = _nonfinite(grads) if grads else ~torch.isfinite(self._loss)
            optimizer.found_inf = bad.float()
        bad = bad.long()
        c = self.counts
        in_a_row = (c[0] + 1) * bad
        update = torch.stack([in_a_row, torch.maximum(c[1], in_a_row), c[2] + bad,
                              torch.where(bad.bool(), step, c[3]), *torch.where(bad.bool(), self._t_range, c[4:])])
        c.copy_(update)

    def host_skip(self, loss: Tensor, t: Tensor, step: int, trainer: Any) -> bool:
        """The fallback: decide now (a synchronisation), on every rank together; True means skip."""
        finite = bool(torch.isfinite(loss.detach()))
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if self.counts is None:
            self.counts = torch.zeros(6, dtype=torch.long)
        c = self.counts
        if finite:
            c[0] = 0
            return False
        c[0] += 1
        c[1] = max(int(c[1]), int(c[0]))
        c[2] += 1
        c[3], c[4], c[5] = step, int(t.min()), int(t.max())
        self.check(trainer)
        return True

    def check(self, trainer: Any = None) -> None:
        """Read the counts back (a synchronisation): warn about skipped steps, stop after a long streak."""
        if self.counts is None:
            return
        counts = self.counts
        if trainer is not None and trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.clone(), reduce_op="max")  # every rank decides the same
        in_a_row, longest, skipped, step, t_min, t_max = (int(v) for v in counts.tolist())
        where = f"at step {step} (timesteps {t_min}..{t_max})"
        if longest >= self.max_in_a_row:
            raise RuntimeError(
                f"training stopped: {longest} non-finite losses in a row, the last {where}; the skipped steps left "
                "the weights as they were before them. Lower the learning rate, check the data for NaN/inf, or "
                "use bf16-mixed instead of 16-mixed"
            )
        if skipped:
            warnings.warn(f"non-finite loss {where}: step skipped ({skipped} skipped since the last check, "
                          f"{in_a_row}/{self.max_in_a_row} in a row)", stacklevel=2)
            self.counts[2] = 0


def _nonfinite(grads: list[Tensor]) -> Tensor:
    """True (a 0-dim bool on the device) if any gradient holds NaN or inf (or overflows the 2-norm)."""
    # The 2-norm, not the max-norm: NaN/inf propagate into both, and torch's CPU max-norm is ~8x slower.
    norms = torch._foreach_norm(grads, 2.0)
    return ~torch.isfinite(torch.stack([n.float() for n in norms]).sum())
