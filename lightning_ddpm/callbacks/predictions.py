"""Write ``predict`` samples to disk: raw tensors plus a PNG grid (images) or scatter plot (2-D)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ..training.plotting import save_edits_grid, save_samples_picture
from .config import Configurable


class SampleWriter(Configurable, pl.Callback):
    """Every rank saves its share with the request indices; rank 0 merges them in request order.

    Outputs in ``output_dir``: ``samples.pt`` ({"samples", "labels"}), ``samples.npy`` for
    vector data, and ``samples.png``; for edit requests of images also ``edits.png``, a row of originals, a row
    of what the model was given (the holes grey) and a row of results. Active only in ``predict``.

    Args:
        output_dir: defaults to ``<trainer.default_root_dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.written: Path | None = None
        self._indices: list[torch.Tensor] = []
        self._samples: list[torch.Tensor] = []
        self._before: list[torch.Tensor] = []  # edit requests: (2, B, ...) originals and what the model was given

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._indices, self._samples, self._before = [], [], []

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(batch, dict) and "index" in batch and isinstance(outputs, torch.Tensor):
            self._indices.append(batch["index"].cpu())
            self._samples.append(outputs.cpu())
            if "images" in batch:  # edit requests: the originals, and what the model was given
                images = batch["images"].cpu().float()
                mask = batch.get("mask")
                given = images if mask is None else images * mask.cpu() + (1 - mask.cpu()) * 0.0  # holes grey
                self._before.append(torch.stack([images, given]))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._samples:
            return
        out = self._dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        shard = {"indices": torch.cat(self._indices), "samples": torch.cat(self._samples)}
        if self._before:
            shard["before"] = torch.cat(self._before, dim=1)
        torch.save(shard, out / f".shard_rank{trainer.global_rank}.pt")
        trainer.strategy.barrier("sample_writer")
        if trainer.is_global_zero:
            self.written = self._merge(trainer, out)
        trainer.strategy.barrier("sample_writer_done")

    def _merge(self, trainer: pl.Trainer, out: Path) -> Path:
        shards = []
        for rank in range(trainer.world_size):
            path = out / f".shard_rank{rank}.pt"
            shards.append(torch.load(path, weights_only=True))
            path.unlink()
        indices, samples = torch.cat([s["indices"] for s in shards]), torch.cat([s["samples"] for s in shards])
        # The distributed sampler may repeat requests to even out ranks: keep each index once.
        order = torch.argsort(indices, stable=True)
        indices, samples = indices[order], samples[order]
        keep = torch.ones_like(indices, dtype=torch.bool)
        keep[1:] = indices[1:] != indices[:-1]
        samples = samples[keep]
        before = torch.cat([s["before"] for s in shards], dim=1)[:, order][:, keep] if "before" in shards[0] else None
        dataset: Any = trainer.predict_dataloaders.dataset if trainer.predict_dataloaders is not None else None
        labels = None
        if getattr(dataset, "labels", None):
            labels = torch.tensor([dataset.labels[i % len(dataset.labels)] for i in indices[keep].tolist()])
        torch.save({"samples": samples, "labels": labels}, out / "samples.pt")
        if samples.ndim == 2:
            import numpy as np

            np.save(out / "samples.npy", samples.numpy())
        reference = None
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
        if samples.ndim == 2 and hasattr(datamodule, "reference_points"):
            reference = datamodule.reference_points()
        picture = save_samples_picture(samples, out / "samples.png", reference, labels, title=f"{len(samples)} samples")
        written = f"{picture.name}, samples.pt"
        if before is not None and samples.ndim == 4:
            mask_given = not torch.equal(before[0], before[1])
            rows = [before[0], before[1], samples] if mask_given else [before[0], samples]
            save_edits_grid(rows, out / "edits.png")
            written += ", edits.png: " + ("original / given / result" if mask_given else "original / result")
        print(f"[lightning-ddpm] wrote {len(samples)} samples to {out} ({written})")
        return out
