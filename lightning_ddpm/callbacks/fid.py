"""FID (and optionally IS and KID) of EMA samples against the validation images, via torchmetrics."""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..data.batches import unpack_batch
from ..samplers import DDIMSampler, Sampler, make_sampler
from .config import Configurable
from .sampling import iter_samples, resolve_sampler


def inception_extractor(features: str, weights_path: str | None) -> nn.Module:
    """torch-fidelity's InceptionV3 (as torchmetrics uses it); weights from ``weights_path`` when given.

    Offline use: on a machine with network, download the file that torch-fidelity fetches
    (``weights-inception-2015-12-05-6726825d.pth``, listed in torch_fidelity/feature_extractor_inceptionv3.py)
    and pass its path here.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(
        name="inception-v3-compat", features_list=[features], feature_extractor_weights_path=weights_path
    )


class FIDCallback(Configurable, pl.Callback):
    """Logs ``val/fid`` (and ``val/is``, ``val/kid_mean``) of ``num_samples`` generated images.

    Real statistics come from the validation images Lightning feeds the first validation
    epoch (DDP-sharded, cached; ``reset_real_features=False``). Each rank generates its share
    of exactly ``num_samples`` with the EMA weights (sample i from seed + i, so the same images at any
    world size); torchmetrics sums the statistics over ranks.

    Args:
        num_samples: generated images per evaluation (50k for paper numbers; fewer during training).
        every_n_validations: evaluate at every this many validation epochs (``None``: never during training),
            counted over the whole run (the count is checkpointed, so a resumed run evaluates at the same steps).
        at_train_end: evaluate once more at the end of fit with ``final_num_samples``.
        final_num_samples: samples for the end-of-training evaluation (default ``num_samples``).
        sampler: a Sampler, a registered name or ``{name, init_args}`` mapping (default ``DDIMSampler(num_steps=100)``).
        final_sampler: the sampler of the end-of-training evaluation (default ``sampler``).
        batch_size: generation batch size per rank.
        feature_extractor: any ``nn.Module`` mapping float images in [0, 1] (B, C, H, W) to (B, D)
            features; replaces Inception (tests use a small network).
        inception_weights_path: local Inception weights for offline machines.
        inception_score: also log ``val/is`` (needs Inception logits, so not with a custom extractor).
        kid: also log ``val/kid_mean`` and ``val/kid_std``.
        kid_subset_size: KID subset size (at most the number of samples).
        seed: seed of the generation: sample i's noise and label come from seed + i alone, whatever the
            number of ranks (the same generated set at any world size).
    """

    def __init__(
        self,
        num_samples: int = 10_000,
        every_n_validations: int | None = 1,
        at_train_end: bool = False,
        final_num_samples: int | None = None,
        sampler: Sampler | str | dict[str, Any] | None = None,
        final_sampler: Sampler | str | dict[str, Any] | None = None,
        batch_size: int = 250,
        feature_extractor: nn.Module | None = None,
        inception_weights_path: str | None = None,
        inception_score: bool = False,
        kid: bool = False,
        kid_subset_size: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 for a covariance, got {num_samples}")
        if inception_score and feature_extractor is not None:
            raise ValueError(
                "inception_score needs Inception logits; it cannot be used with a custom feature_extractor"
            )
        self.num_samples, self.final_num_samples = num_samples, final_num_samples or num_samples
        self.every_n_validations, self.at_train_end = every_n_validations, at_train_end
        self._default_sampler = sampler is None
        self._sampler_spec = sampler  # a name or mapping is rebuilt in setup with its default steps capped at T
        self.sampler = make_sampler(sampler) if sampler is not None else DDIMSampler(num_steps=100)
        self._final_sampler_spec = final_sampler
        self.final_sampler = None if final_sampler is None else make_sampler(final_sampler)  # None: as sampler
        self.batch_size, self.seed = batch_size, seed
        self.custom = feature_extractor is not None
        self.feature_extractor, self.inception_weights_path = feature_extractor, inception_weights_path
        self.use_kid, self.use_inception_score = kid, inception_score
        self.kid_subset_size = kid_subset_size
        # Built on first use (setup), so that parsing a config never downloads Inception weights.
        self.fid: Any = None
        self.kid: Any = None
        self.inception: Any = None
        self.real_done = False
        self._validations = 0
        self.last: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        # two FID callbacks in one run (e.g. a frequent cheap one and a rare full one) keep their own counters
        return self._generate_state_key(
            num_samples=self.num_samples, every_n_validations=self.every_n_validations, seed=self.seed
        )

    def state_dict(self) -> dict[str, Any]:
        # every_n_validations counts the run's validations: a resumed run evaluates where an uninterrupted
        # one does. The real statistics are not kept; the next validation collects them again.
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))

    def build_metrics(self) -> None:
        """Create the torchmetrics objects (loads Inception unless a custom extractor was given)."""
        if self.fid is not None:
            return
        from torchmetrics.image.fid import FrechetInceptionDistance

        def extractor(features: str) -> nn.Module:
            if self.feature_extractor is not None:
                return self.feature_extractor
            return inception_extractor(features, self.inception_weights_path)

        self.fid = FrechetInceptionDistance(feature=extractor("2048"), reset_real_features=False)
        if self.use_kid:
            from torchmetrics.image.kid import KernelInceptionDistance

            with warnings.catch_warnings():
                # torchmetrics warns that KID keeps every feature in memory: here at most num_samples of them
                warnings.filterwarnings("ignore", message=r"Metric `Kernel Inception Distance` will save all")
                self.kid = KernelInceptionDistance(
                    feature=extractor("2048"),
                    reset_real_features=False,
                    subset_size=min(self.kid_subset_size, self.num_samples),
                )
        if self.use_inception_score:
            from torchmetrics.image.inception import InceptionScore

            self.inception = InceptionScore(feature=extractor("logits_unbiased"))

    def _metrics(self) -> list[Any]:
        return [m for m in (self.fid, self.kid, self.inception) if m is not None]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.at_train_end and trainer.limit_val_batches == 0:
            # the real statistics come from validation: say so now rather than after the whole run
            raise ValueError(
                "FIDCallback(at_train_end=True) needs validation batches for its real statistics; "
                "trainer.limit_val_batches is 0"
            )
        self.sampler = resolve_sampler(self._sampler_spec, self.sampler, pl_module, 100)
        if self._final_sampler_spec is not None and self.final_sampler is not None:
            self.final_sampler = resolve_sampler(self._final_sampler_spec, self.final_sampler, pl_module, 100)
        self.build_metrics()
        for metric in self._metrics():
            metric.to(pl_module.device)

    def _prepare(self, images: Tensor) -> Tensor:
        """[-1, 1] images -> what the extractor takes: [0, 1] floats (custom) or 3-channel uint8 (Inception)."""
        images = images.float().clamp(-1, 1).add(1).div(2)
        if self.custom:
            return images
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images * 255).round().to(torch.uint8)

    def _update(self, images: Tensor, real: bool) -> None:
        self.build_metrics()
        prepared = self._prepare(images)
        self.fid.update(prepared, real=real)
        if self.kid is not None:
            self.kid.update(prepared, real=real)
        if self.inception is not None and not real:
            self.inception.update(prepared)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.real_done or trainer.sanity_checking:
            return
        images, _ = unpack_batch(batch)
        self._update(images.to(pl_module.device), real=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.real_done = True
        self._validations += 1
        if self.every_n_validations and self._validations % self.every_n_validations == 0:
            values = self.evaluate(trainer, pl_module, self.num_samples)
            for name, value in values.items():
                pl_module.log(name, value, sync_dist=False, rank_zero_only=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end:
            if not self.real_done:
                raise RuntimeError(
                    "FIDCallback(at_train_end=True) needs at least one validation epoch for real statistics"
                )
            values = self.evaluate(trainer, pl_module, self.final_num_samples, self.final_sampler)
            for logger in trainer.loggers:
                logger.log_metrics(
                    {k.replace("val/", "final/"): v for k, v in values.items()}, step=trainer.global_step
                )

    @torch.no_grad()
    def evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, total: int, sampler: Sampler | None = None
    ) -> dict[str, float]:
        """Generate this rank's share with EMA weights, sync the statistics, return the metrics.

        Sample i (its noise and, for a class-conditional model, its label) comes from seed + i alone and each
        rank draws a block of them (:func:`~lightning_ddpm.callbacks.sampling.iter_samples`), so the generated
        set is the same at any world size."""
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        from tqdm.auto import tqdm

        start = time.perf_counter()
        with tqdm(
            total=-(-total // max(trainer.world_size, 1)),
            desc=f"FID samples (rank 0 of {trainer.world_size})",
            disable=not show,
            leave=False,
        ) as bar:
            # Every rank draws the largest share in the same batches (the last pads its share with repeats, which
            # are dropped): under a sharded strategy (FSDP2) each forward needs every rank.
            for drawn in iter_samples(
                trainer,
                pl_module,
                total,
                sampler or self.sampler,
                seed=self.seed,
                labels="random",
                batch_size=self.batch_size,
            ):
                if drawn.real > 0:
                    self._update(drawn.samples[: drawn.real], real=False)
                bar.update(drawn.real)
        elapsed = time.perf_counter() - start
        # compute() syncs and then restores the local state: count the samples of all ranks explicitly.
        local = self.fid.fake_features_num_samples.detach().float()
        self.counted_fake = int(trainer.strategy.reduce(local, reduce_op="sum").item())
        values = {"val/fid": float(self.fid.compute()), "val/fid_time_s": elapsed}
        if self.kid is not None:
            mean, std = self.kid.compute()
            values.update({"val/kid_mean": float(mean), "val/kid_std": float(std)})
        if self.inception is not None:
            mean, _ = self.inception.compute()
            values["val/is"] = float(mean)
        for metric in self._metrics():
            metric.reset()  # fake statistics only; real ones are kept
        features = type(self.feature_extractor).__name__ if self.custom else "Inception"
        kid = f", KID {values['val/kid_mean']:.4g}" if self.kid is not None else ""
        rank_zero_info(
            f"[lightning-ddpm] FID ({features} features) over {total} samples: {values['val/fid']:.3f}{kid} "
            f"({elapsed:.1f} s)"
        )
        self.last = values
        return values
