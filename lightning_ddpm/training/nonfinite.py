"""Skip optimizer steps with NaN/inf gradients without a host-device synchronisation per step.

GradScaler's way: a ``found_inf`` flag computed on the device (by the same fused check GradScaler
uses, ``_amp_foreach_non_finite_check_and_unscale_`` with a scale of 1) and handed to an optimizer
that can skip on the device (torch's fused Adam, AdamW and SGD read ``optimizer.found_inf``; the
module makes Adam and AdamW fused by default). The flag comes from the gradients, which DDP has
already averaged, so every rank skips together (under FSDP2 each rank checks its own shard of the
gradients and the flags are all-reduced, a launch rather than a synchronisation). Each step's flag
and timestep range go into a buffer on the device; the module calls :meth:`NonFiniteGuard.check`,
which reads the buffer back, every ``log_every_n_steps`` steps and at the end of fit: a warning
reports the skipped steps and a streak of ``max_in_a_row`` stops training.

Optimizers that cannot skip on the device fall back to the host (one synchronisation per step, two
when the loss is finite): :meth:`NonFiniteGuard.host_skip` skips a step whose loss is not finite before
backward, and :meth:`NonFiniteGuard.host_skip_gradients` one whose gradients are not, by dropping the
gradients (torch's optimizers leave a parameter without a gradient untouched, state included). Under
16-mixed, Lightning's GradScaler already skips overflowing
steps (overflow is routine while it calibrates its scale), so the guard counts non-finite
*losses* only and leaves the skipping to it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
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
        self.scaler = False
        self.in_a_row = 0  # consecutive non-finite steps, as of the last check
        self._steps: list[int] = []  # the optimizer steps flagged in the buffers since the last check
        self._flags: Tensor | None = None
        self._t_ranges: Tensor | None = None
        self._one: Tensor | None = None
        self._group: Any = None  # FSDP2: the process group the gradients are sharded over
        self._params: list[Tensor] = []  # the trained parameters, listed once at the start of fit
        self._checked_step = -1

    # -- the module's training hooks, one call each ------------------------------------------------

    def on_train_start(self, module: Any) -> None:
        """Choose the path from the fit's optimizer and precision; list the trained parameters once."""
        trainer = module.trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        self._params = [p for p in module.backbone.parameters() if p.requires_grad]
        self.start(trainer.optimizers[0] if trainer.optimizers else None, scaler, module.device, self._params)
        self._checked_step = -1

    def training_step(self, loss: Tensor, t: Tensor, module: Any) -> Tensor | None:
        """The step's loss, or None to have Lightning skip backward and the optimizer step (host path only)."""
        if self.on_device:
            self.remember(loss, t)  # the optimizer skips the step on the device if it must
            return loss
        return None if self.host_skip(loss, t, module.global_step, module._trainer) else loss

    def on_before_optimizer_step(self, optimizer: Any, module: Any) -> None:
        if self.on_device:
            self.before_optimizer_step(optimizer, self._params, module.global_step)
        else:  # the host fallback: a finite loss can still have NaN/inf gradients
            self.host_skip_gradients(self._params, module.global_step, module._trainer)

    def on_train_batch_end(self, module: Any) -> None:
        """Read the counts back every ``log_every_n_steps`` optimizer steps (once per step, whatever the
        gradient accumulation)."""
        step, trainer = module.global_step, module.trainer
        if self.on_device and step % trainer.log_every_n_steps == 0 and step != self._checked_step:
            self._checked_step = step
            self.check(trainer)

    def on_train_end(self, module: Any) -> None:
        if self.on_device:
            self.check(module.trainer)

    # -- the two paths -------------------------------------------------------------------------------

    def start(self, optimizer: Any, scaler: bool, device: torch.device, parameters: Sequence[Tensor] = ()) -> None:
        """Choose the device path where the optimizer can skip on the device, or a scaler skips.
        ``parameters``: the trained ones, whose sharding (FSDP2) is fixed for the fit."""
        # torch's fused Adam, AdamW and SGD read optimizer.found_inf and skip the step on the device
        self.on_device = scaler or bool(getattr(optimizer, "defaults", {}).get("fused"))
        self.scaler = scaler
        self._group = _shard_group(list(parameters))
        self.in_a_row, self._steps = 0, []
        self._flags = torch.zeros(64, device=device)  # per step: 1.0 if skipped (found_inf's dtype)
        self._t_ranges = torch.zeros(64, 2, dtype=torch.long, device=device)  # per step: its t min and max
        self._one = torch.ones((), device=device)

    def remember(self, loss: Tensor, t: Tensor) -> None:
        """Called in the training step: the loss and timesteps, for the flag and the warning."""
        self._loss, self._t = loss.detach(), t

    def before_optimizer_step(self, optimizer: Any, parameters: Iterable[Tensor], step: int) -> None:
        """Flag this step on the device; the optimizer skips it (fused found_inf, or GradScaler).

        ``parameters``: a list (not a generator: walking the modules costs ~0.5 ms a step on a CPU).
        """
        if not self.on_device or self._flags is None or self._t_ranges is None or self._one is None:
            return
        i = len(self._steps)
        if i == len(self._flags):  # checked less often than the buffers hold: grow them
            self._flags = torch.cat([self._flags, torch.zeros_like(self._flags)])
            self._t_ranges = torch.cat([self._t_ranges, torch.zeros_like(self._t_ranges)])
        flag = self._flags[i]  # zero until now; a view, written in place
        # GradScaler checks the gradients itself (16-mixed): then the guard counts non-finite losses
        grads = [] if self.scaler else [p.grad for p in parameters if p.grad is not None]
        if self._group is not None:  # FSDP2: each rank holds a shard of every gradient and checks its own
            grads = [g.to_local() for g in grads]  # type: ignore[attr-defined]  # DTensor shards (FSDP2)
        for same_dtype in _by_dtype(grads):  # sets the flag to 1 if any value is NaN/inf (and scales by 1)
            torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, flag, self._one)
        if not grads:
            flag.copy_(~torch.isfinite(self._loss))
        if self._group is not None:  # a NaN in one rank's shard skips the step on every rank (a launch, no sync)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        if not self.scaler:
            optimizer.found_inf = flag
        torch.aminmax(self._t, out=(self._t_ranges[i, 0], self._t_ranges[i, 1]))
        self._steps.append(step)

    def host_skip(self, loss: Tensor, t: Tensor, step: int, trainer: Any) -> bool:
        """The fallback: decide now (a synchronisation), on every rank together; True means skip.

        A finite loss is tallied after backward, by :meth:`host_skip_gradients`."""
        finite = bool(torch.isfinite(loss.detach()))
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        self._t = t
        if not finite:
            self._tally([step], [(1, int(t.min()), int(t.max()))])
        return not finite

    def host_skip_gradients(self, parameters: Sequence[Tensor], step: int, trainer: Any) -> bool:
        """The fallback after backward: if any gradient is NaN/inf (on any rank), drop every gradient so that
        the optimizer leaves the weights and its state as they were; True means the step is skipped."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:  # the loss was not finite: backward was skipped and host_skip tallied the step
            return False
        if self._group is not None:
            grads = [g.to_local() for g in grads]  # type: ignore[attr-defined]  # DTensor shards (FSDP2)
        flag = torch.zeros((), device=grads[0].device)
        one = torch.ones((), device=grads[0].device)
        for same_dtype in _by_dtype(grads):
            torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, flag, one)
        finite = not bool(flag)
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            for p in parameters:
                p.grad = None
        t = self._t
        self._tally([step], [(0, 0, 0)] if finite else [(1, int(t.min()), int(t.max()))], what="gradients")
        return not finite

    def check(self, trainer: Any = None) -> None:
        """Read the buffers back (a synchronisation): warn about skipped steps, stop after a long streak."""
        n = len(self._steps)
        if self._flags is None or self._t_ranges is None or n == 0:
            return
        rows = torch.cat([self._flags[:n, None].long(), self._t_ranges[:n]], 1)
        if trainer is not None and trainer.world_size > 1:
            rows = trainer.strategy.reduce(rows, reduce_op="max")  # every rank decides the same
        steps, values = self._steps, rows.tolist()
        self._flags[:n] = 0
        self._steps = []
        self._tally(steps, values)

    def _tally(self, steps: Sequence[int], rows: Sequence[Sequence[int]], what: str = "loss") -> None:
        """Count the steps' flags (``rows``: [skipped, t min, t max] per step) into the streak; warn or stop."""
        skipped, where = 0, ""
        for step, (bad, t_min, t_max) in zip(steps, rows):
            if not bad:
                self.in_a_row = 0
                continue
            self.in_a_row, skipped, where = (
                self.in_a_row + 1,
                skipped + 1,
                f"at step {step} (timesteps {t_min}..{t_max})",
            )
            if self.in_a_row >= self.max_in_a_row:
                raise RuntimeError(
                    f"training stopped: {self.in_a_row} non-finite losses in a row, the last {where}; the skipped "
                    "steps left the weights as they were before them. Lower the learning rate, check the data for "
                    "NaN/inf, or use bf16-mixed instead of 16-mixed"
                )
        if skipped:
            warnings.warn(
                f"non-finite {what} {where}: step skipped ({skipped} skipped since the last check, "
                f"{self.in_a_row}/{self.max_in_a_row} in a row)",
                stacklevel=4,
            )  # the module's hook


def _shard_group(tensors: list[Tensor]) -> Any:
    """The process group over which the tensors (parameters, or their gradients) are sharded by FSDP2, or None."""
    if not tensors or not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return tensors[0].device_mesh.get_group() if isinstance(tensors[0], DTensor) else None


def _by_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
    """The tensors in groups of one dtype (a foreach kernel's fast path wants one)."""
    dtypes = {x.dtype for x in tensors}
    return [tensors] if len(dtypes) <= 1 else [[x for x in tensors if x.dtype == d] for d in dtypes]
