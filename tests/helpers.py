"""Callbacks and data the Lightning tests import (also from CLI subprocesses, via PYTHONPATH)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]


TINY_MLP = {"name": "mlp", "init_args": {"hidden_dim": 16, "num_blocks": 1}}


def toy_module(seed: int | None = None) -> Any:
    """A 2-D DiffusionModule small enough for many short fits: TINY_MLP, T = 20, SGD lr 0.5, no warm-up; its
    initialisation drawn after ``torch.manual_seed(seed)`` when a seed is given."""
    from lightning_ddpm import DiffusionModule

    if seed is not None:
        torch.manual_seed(seed)
    return DiffusionModule(
        backbone=TINY_MLP,
        data_shape=[2],
        num_timesteps=20,
        lr_warmup_steps=0,
        optimizer={"name": "torch.optim.SGD", "init_args": {"lr": 0.5}},
    )


def documentation() -> str:
    """The README and every page of the documentation site, one text: the claims tests read what the docs say
    wherever it now stands."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n\n".join(page.read_text() for page in pages)


def run_cli_process(args: list[str], cwd: Path, timeout: int = 300) -> None:
    """``python -m lightning_ddpm <args>`` in a fresh process (multi-process strategies launch from it): this
    checkout importable, one OpenMP thread per process, Lightning's fork launcher off. Fails on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_ddpm", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]


class DumpWeights(pl.Callback):
    """At the end of fit, every rank saves its backbone weights to ``<dirpath>/rank<r>.pt``."""

    prefix = ""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def _dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.backbone.state_dict(), Path(self.dirpath) / f"{self.prefix}rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, pl_module)


class DumpStartWeights(DumpWeights):
    """At the start of training (after DDP's broadcast), every rank saves its backbone weights to
    ``<dirpath>/start_rank<r>.pt``: what "training changed the weights" must be compared with."""

    prefix = "start_"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the start weights only


class DumpFirstTrainingDraws(pl.Callback):
    """Every rank saves the timesteps and noise its first training step drew (what ``q_sample`` was
    given) to ``<dirpath>/draws_rank<r>.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        diffusion = pl_module.diffusion
        q_sample = diffusion.q_sample

        def recording(x0, t, noise=None, *args, **kwargs):
            del diffusion.q_sample  # record once: back to the class's method
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
            torch.save(
                {"t": t.detach().cpu(), "noise": noise.detach().cpu()},
                Path(self.dirpath) / f"draws_rank{trainer.global_rank}.pt",
            )
            return q_sample(x0, t, noise, *args, **kwargs)

        diffusion.q_sample = recording


class RecordStartStep(pl.Callback):
    """Remembers the global step at which training (re)started."""

    def __init__(self) -> None:
        self.start_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step


class TinyFeatures(torch.nn.Module):
    """A fixed random conv feature extractor for FID tests: float images in [0, 1] -> (B, 4 * dim)."""

    def __init__(self, channels: int = 1, dim: int = 8) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, dim, 3, padding=1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.5)
            self.conv.bias.zero_()
        self.num_features = 4 * dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x.float())), 2).flatten(1)


class DumpFID(pl.Callback):
    """Saves the FID callback's sample count and value, and the number of ``sample`` calls, from every rank,
    at the end of fit."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.sample_calls = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        sample = pl_module.sample

        def counting(*args, **kwargs):
            self.sample_calls += 1
            return sample(*args, **kwargs)

        pl_module.sample = counting

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import json

        from lightning_ddpm.callbacks import FIDCallback

        fid = next(c for c in trainer.callbacks if isinstance(c, FIDCallback))
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        record = {"counted": fid.counted_fake, "fid": fid.last.get("val/fid"), "sample_calls": self.sample_calls}
        (Path(self.dirpath) / f"fid_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class RecordWeights(pl.Callback):
    """Raw weights after every optimizer step, and the weights seen by validation."""

    def __init__(self) -> None:
        self.after_step: list[list[torch.Tensor]] = []
        self.at_validation: list[list[torch.Tensor]] = []
        self.at_train_batch_start: list[list[torch.Tensor]] = []

    @staticmethod
    def _params(pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [p.detach().clone() for p in getattr(pl_module, "backbone", pl_module).parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.at_train_batch_start.append(self._params(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step.append(self._params(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and batch_idx == 0:
            self.at_validation.append(self._params(pl_module))


class DumpSamples(pl.Callback):
    """Counts each rank's backbone calls outside training; at the end every rank saves that count and
    rank 0 the SampleLogger's last samples, to ``<dirpath>``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.eval_calls = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        forward = pl_module.backbone.forward

        def counting(*args, **kwargs):
            if not pl_module.backbone.training:
                self.eval_calls += 1
            return forward(*args, **kwargs)

        pl_module.backbone.forward = counting

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_ddpm.callbacks import SampleLogger

        logger = next(c for c in trainer.callbacks if isinstance(c, SampleLogger))
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        torch.save(
            {"eval_calls": self.eval_calls, "samples": logger.last_samples},
            Path(self.dirpath) / f"samples_rank{trainer.global_rank}.pt",
        )


class NaNOutputOnRank(pl.Callback):
    """Makes the backbone's output NaN on one rank at the given training steps: that rank's loss, and
    through DDP's gradient all-reduce every rank's gradients, become non-finite. When fit fails, each rank
    saves its backbone weights and the error to ``<dirpath>/rank<r>.pt`` / ``.txt``."""

    def __init__(self, rank: int, steps: list[int], dirpath: str) -> None:
        self.rank, self.steps, self.dirpath, self.handle = rank, set(steps), dirpath, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step in self.steps:
            self.handle = pl_module.backbone.register_forward_hook(lambda module, args, out: out * float("nan"))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.backbone.state_dict(), Path(self.dirpath) / f"rank{trainer.global_rank}.pt")
        (Path(self.dirpath) / f"rank{trainer.global_rank}.txt").write_text(str(exception))


class DumpShards(pl.Callback):
    """At the start of training every rank writes how much of the backbone (and of the EMA average) it
    holds, and how many FSDP units it has, to ``<dirpath>/shards_rank<r>.json``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import json

        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        from lightning_ddpm.callbacks import EMA

        def local(params) -> int:
            return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)

        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        record = {
            "local": local(pl_module.backbone.parameters()),
            "total": sum(p.numel() for p in pl_module.backbone.parameters()),
            "ema_local": local(ema._average_model.module.backbone.parameters()),
            "sharded_units": sum(isinstance(m, FSDPModule) for m in pl_module.backbone.modules()),
        }
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        (Path(self.dirpath) / f"shards_rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import json

        from torch._dynamo.utils import counters

        record = {
            "compiled_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "reasons": list(counters["graph_break"]),
        }
        (Path(self.dirpath) / f"compile_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class PoisonShardGrad(pl.Callback):
    """At training step ``step``, rank ``rank`` makes one element of its own shard of the first parameter's
    gradient NaN (FSDP2: the other rank never sees it). Every rank writes to ``<dirpath>/poison_rank<r>.json``
    whether its shard of the weights is unchanged by that step and by the step after it."""

    def __init__(self, rank: int, step: int, dirpath: str) -> None:
        self.rank, self.step, self.dirpath = rank, step, dirpath
        self.before: list[torch.Tensor] = []
        self.unchanged: dict[int, bool] = {}

    @staticmethod
    def _local(pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [p.to_local().detach().clone() for p in pl_module.backbone.parameters()]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        self.before = self._local(pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            grad = next(pl_module.backbone.parameters()).grad.to_local()
            grad.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step just taken
        if step in (self.step, self.step + 1):
            self.unchanged[step] = all(torch.equal(a, b) for a, b in zip(self.before, self._local(pl_module)))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import json

        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        record = {str(k): v for k, v in self.unchanged.items()}
        (Path(self.dirpath) / f"poison_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class PerRankRNG(pl.Callback):
    """Gives every rank RNG streams of its own, as GPUs do: the global (CPU) generator is reseeded with
    ``1000 + rank`` at setup (a checkpoint restored afterwards overrides it), and the CPU is made to look like an
    accelerator whose device generator (seeded ``100 + rank``, one draw per training step, like dropout on a GPU)
    is registered in ``DEVICE_RNG``, so checkpoints save and restore it like a CUDA device's. At the end every
    rank saves both generators' states to ``<dirpath>/rng_rank<r>.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.device_generator = torch.Generator()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_ddpm.training.checkpoints import DEVICE_RNG

        torch.manual_seed(1000 + trainer.global_rank)
        self.device_generator.manual_seed(100 + trainer.global_rank)
        DEVICE_RNG["cpu"] = (
            lambda device: self.device_generator.get_state(),
            lambda state, device: self.device_generator.set_state(state),
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        torch.rand(1, generator=self.device_generator)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        torch.save(
            {"torch": torch.get_rng_state(), "device": self.device_generator.get_state()},
            Path(self.dirpath) / f"rng_rank{trainer.global_rank}.pt",
        )


class DeviceWithoutFloat64(torch.overrides.TorchFunctionMode):
    """Pretends the CPU is a device without float64, as MPS is: a tensor is "on the device" when it was moved or
    created there (``.to(device)``, a factory given ``device=``) or computed from such a tensor, and a float64
    one of those raises, as MPS refuses it. Host-side float64 (schedules, sampler grids) stays allowed. Use it
    with ``lightning_ddpm.core.dtypes.NO_FLOAT64`` patched to include ``"cpu"``, so the library treats the CPU so."""

    def __init__(self) -> None:
        super().__init__()
        self._on_device: dict[int, Any] = {}

    def _marked(self, tensor: torch.Tensor) -> bool:
        ref = self._on_device.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_leaves

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        moved = func in (torch.Tensor.to, torch.Tensor.cuda) and any(
            isinstance(a, (torch.device, str, torch.Tensor)) for a in [*args[1:], kwargs.get("device")]
        )
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if moved or kwargs.get("device") is not None or any(self._marked(a) for a in inputs):
            for tensor in (t for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
                if tensor.dtype in (torch.float64, torch.complex128):
                    raise TypeError(
                        f"{getattr(func, '__name__', func)}: float64 on a device without float64 "
                        "(as MPS: 'Cannot convert a MPS Tensor to float64 dtype')"
                    )
                self._on_device[id(tensor)] = weakref.ref(tensor)
        return out


class _DiesInWorker(torch.utils.data.Dataset):
    """Its first item kills the worker process that loads it (as the kernel's OOM killer would)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        import signal

        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(2)


class WorkerKilledData(pl.LightningDataModule):
    """2-D data whose single DataLoader worker is killed on its first batch."""

    data_shape, num_classes = [2], None

    def __init__(self, num_workers: int = 1) -> None:
        super().__init__()
        self.num_workers = num_workers

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_DiesInWorker(), batch_size=8, num_workers=self.num_workers)
