"""Draw a fixed-seed batch of samples during training, save a picture and log it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from ..samplers import DDIMSampler, Sampler, make_sampler
from ..training.plotting import load_png, save_image_grid, save_samples_picture
from .config import Configurable
from .sampling import draw_samples, resolve_sampler


class SampleLogger(Configurable, pl.Callback):
    """Every ``every_n_steps`` optimizer steps and/or ``every_n_epochs`` epochs, and at the end of fit,
    with the EMA weights when an :class:`~lightning_ddpm.callbacks.EMA` callback is active.

    The same seed every time, so consecutive pictures show the model's progress on the same
    noise. A class-conditional model gets one row (images) or one colour (2-D) per class.
    Images go to a PNG grid, 2-D samples to a scatter plot over the data; TensorBoard gets the
    picture as an image, other loggers get its path in the console.

    Args:
        every_n_steps: sample every this many optimizer steps (``None``: off).
        every_n_epochs: sample at the end of every this many epochs (``None``: off).
        num_samples: samples per picture (images: use a square number; 2-D: a few thousand).
        sampler: a Sampler, a registered name (``dpmpp_2m``, ...) or ``{name, init_args}`` mapping;
            defaults to the module's own sampler (``DiffusionModule(sampler=...)``, ``model.sampler`` in a
            config; DDIM 50 unless set), else ``DDIMSampler(num_steps=50)``.
        seed: seed of the sampling noise.
        output_dir: defaults to ``<log_dir>/samples``.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        num_samples: int = 64,
        sampler: Sampler | str | dict[str, Any] | None = None,
        seed: int = 0,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.num_samples, self.seed, self.output_dir = num_samples, seed, output_dir
        self._default_sampler = sampler is None
        self._sampler_spec = sampler  # a name or mapping is rebuilt in setup with its default steps capped at T
        self.sampler = make_sampler(sampler) if sampler is not None else DDIMSampler(num_steps=50)
        self.last_path: Path | None = None
        self.last_samples: torch.Tensor | None = None  # rank 0: the samples of the last picture
        self._last_step = -1

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.sampler = resolve_sampler(self._sampler_spec, self.sampler, pl_module, 50, module_default=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_samples(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_samples(trainer, pl_module)

    @torch.no_grad()
    def log_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Every rank draws its share and rank 0 writes the picture: under FSDP or DeepSpeed-3 each
        forward gathers parameters from every rank, so all of them must sample. Sample i comes from
        seed + i alone, so the picture is the same whatever the number of ranks."""
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        out_dir = self._dir(trainer)  # trainer.log_dir broadcasts: every rank must ask
        all_labels, per_class = None, 0
        num_classes = getattr(pl_module, "num_classes", None)
        if num_classes:
            per_class = max(1, self.num_samples // num_classes)
            all_labels = torch.arange(num_classes).repeat_interleave(per_class)
        num = len(all_labels) if all_labels is not None else self.num_samples
        # every rank draws its share, sample i from seed + i; gathered in order on every rank
        samples = draw_samples(trainer, pl_module, num, sampler=self.sampler, seed=self.seed, labels=all_labels)
        if not trainer.is_global_zero:
            return None
        self.last_samples = samples.cpu()
        reference = None
        datamodule: Any = getattr(trainer, "datamodule", None)  # set by Lightning's data connector
        if samples.ndim == 2 and hasattr(datamodule, "reference_points"):
            reference = datamodule.reference_points()
        path = out_dir / f"step_{step:07d}.png"
        if samples.ndim == 4 and all_labels is not None:
            save_image_grid(samples, path, nrow=per_class)  # one row per class
        else:
            save_samples_picture(samples, path, reference, all_labels, title=f"step {step}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", load_png(path), step)
        rank_zero_info(f"[lightning-ddpm] samples at step {step}: {path}")
        self.last_path = path
        return path
