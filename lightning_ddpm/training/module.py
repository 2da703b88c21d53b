"""DiffusionModule: Lightning glue around a backbone and a GaussianDiffusion.

Every constructor argument is plain data (names, numbers, ``{name, init_args}`` mappings), so
``load_from_checkpoint(path)`` rebuilds the model alone and the checkpoint holds no pickled objects. The
parts live beside it: ``build`` (the diffusion and backbone), ``optim``, ``nonfinite``, ``checkpoints``,
``seeding``, ``fsdp``, ``sampling`` and ``metrics``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ..backbones import BackboneSpec
from ..core.denoiser import Denoiser
from ..core.guidance import drop_labels
from ..core.timestep_sampling import LossSecondMomentSampler, make_timestep_sampler
from ..data.batches import check_image_range, check_labels, unpack_batch
from ..interop.module import DiffusersInterop
from ..samplers import Generators, Sampler, make_sampler
from .build import build_diffusion, build_linked_backbone, check_settings, linked_backbone_args
from .checkpoints import (
    COMPATIBLE_SETTINGS,
    check_loaded_checkpoint,
    check_local_checkpoint_file,
    restore_module_state,
    root_device,
    save_module_state,
)
from .fsdp import shard_over_mesh
from .metrics import TimestepLosses, log_epoch_losses
from .nonfinite import NonFiniteGuard
from .optim import make_optimizer, optimizer_spec
from .sampling import check_edit_images, check_sample_args, conditioned, edit_request, evaluating, initial_noise
from .seeding import request_generators, step_generator

__all__ = ["DiffusionModule"]

STAGES = ("train", "val", "test")


class DiffusionModule(DiffusersInterop, pl.LightningModule):
    """A denoising diffusion model ready for ``Trainer.fit``; every argument is plain data.

    Args:
        backbone: a registered name (``unet``, ``mlp``), a class path or a ``{"name", "init_args"}`` mapping (an
            ``nn.Module`` works too, but then ``load_from_checkpoint`` needs ``backbone=`` again).
        data_shape: one example's shape, e.g. ``[3, 32, 32]`` or ``[2]`` (linked from the data in the CLI).
        num_classes: the number of classes of a class-conditional model, else ``None`` (linked from the data).
        schedule: a schedule name (see ``available_schedules()``).
        num_timesteps: T.
        schedule_kwargs: the schedule's options, e.g. ``{"beta_start": 1e-4, "beta_end": 0.02}``.
        rescale_to_zero_terminal_snr: Lin et al. 2024.
        parameterization: ``eps``, ``x0``, ``mu``, ``v`` or a name registered in ``core.parameterizations``.
        variance: ``fixed_small``, ``fixed_large`` or ``learned_range``.
        loss: ``simple``, ``vlb`` or ``hybrid``.
        loss_weighting: ``none``, ``elbo``, ``min_snr`` or a name registered in ``core.weightings.LOSS_WEIGHTINGS``.
        min_snr_gamma: gamma of Min-SNR weighting.
        hybrid_lambda: lambda of L_hybrid.
        timestep_sampler: ``uniform`` or ``loss_second_moment``.
        clip_denoised: clip pred_x0 to [-1, 1] when sampling (on for images, off for 2-D data).
        cond_drop_prob: the probability of training on the null label instead of the class (classifier-free
            guidance, Ho & Salimans 2022); used only when ``num_classes`` is set.
        optimizer: ``{"name": "torch.optim.Adam", "init_args": {"lr": 2e-4}}`` by default (Ho et al.).
        lr_warmup_steps: linear learning-rate warm-up over this many optimizer steps (5000 in Ho et al.).
        sampler: the default sampler of ``sample`` and ``predict``: a name in ``lightning_ddpm.samplers.SAMPLERS``,
            a class path, or a mapping such as ``{"name": "dpmpp_2m", "init_args": {"num_steps": 10}}``.
        guidance_scale: the default classifier-free guidance w of a class-conditional model (0: unconditional,
            1: conditional, > 1: guided).
        max_nonfinite_steps: steps with NaN/inf gradients (or, under 16-mixed, loss) are skipped and reported;
            this many in a row stop training (checked every ``log_every_n_steps``, see ``nonfinite.py``).
        compile: ``torch.compile`` the backbone: ``True`` or a mapping of options such as
            ``{"mode": "max-autotune"}``. The state dict is unchanged.
        channels_last: image batches and backbone in channels-last memory format (what GPU convolutions want;
            on a CPU under bf16, ``False`` measured 2-8% faster, see docs/benchmarks.md).
        init_from: a diffusers folder (a DDPM pipeline or a bare ``UNet2DModel``) whose U-Net weights initialise
            the ``unet`` backbone at setup; its architecture and schedule must be this model's. Nothing is
            downloaded; a checkpoint given to the trainer takes precedence, and ``load_from_checkpoint`` never
            applies it again.
    """

    def __init__(
        self,
        backbone: BackboneSpec = "mlp",
        data_shape: Sequence[int] = (2,),
        num_classes: int | None = None,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        schedule_kwargs: dict[str, Any] | None = None,
        rescale_to_zero_terminal_snr: bool = False,
        parameterization: str = "eps",
        variance: str = "fixed_small",
        loss: str = "simple",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        hybrid_lambda: float = 1e-3,
        timestep_sampler: str = "uniform",
        clip_denoised: bool = False,
        cond_drop_prob: float = 0.1,
        optimizer: dict[str, Any] | None = None,
        lr_warmup_steps: int = 5000,
        sampler: str | dict[str, Any] = "ddim",
        guidance_scale: float = 1.0,
        max_nonfinite_steps: int = 10,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = True,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if isinstance(backbone, nn.Module):
            warnings.warn(
                "backbone given as an nn.Module instance: pass backbone=... again to load_from_checkpoint "
                "(give a name or {name, init_args} mapping to make checkpoints self-contained)",
                stacklevel=2,
            )
        self.data_shape = check_settings(data_shape, num_classes, cond_drop_prob, guidance_scale, lr_warmup_steps)
        self.num_classes = num_classes
        self.guidance_scale = guidance_scale
        self.cond_drop_prob = cond_drop_prob
        self.lr_warmup_steps = lr_warmup_steps
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.use_channels_last = channels_last and len(self.data_shape) == 3

        self.diffusion = build_diffusion(
            schedule,
            num_timesteps,
            schedule_kwargs,
            rescale_to_zero_terminal_snr,
            parameterization,
            variance,
            loss,
            loss_weighting,
            min_snr_gamma,
            hybrid_lambda,
            clip_denoised,
        )
        shared = linked_backbone_args(self.data_shape, num_classes, self.diffusion)
        self.linked_backbone_args = shared  # what the data and the diffusion decide (also for diffusers export)
        self.backbone = build_linked_backbone(
            backbone, shared, self.data_shape, self.diffusion, self.use_channels_last, compile
        )
        # Every rank computes the same schedule constants: DDP need not broadcast them before each forward.
        self._ddp_params_and_buffers_to_ignore = [f"diffusion.{name}" for name, _ in self.diffusion.named_buffers()]
        self.timestep_sampler = make_timestep_sampler(timestep_sampler, num_timesteps)
        self._init_loaded = False  # init_from is applied at the first setup only
        # A sampler's default num_steps is capped at T (a bare "ddim" means 50 steps, or all T when T is
        # smaller); an explicit num_steps > T is an error, raised here rather than after training.
        self.default_sampler: Sampler = make_sampler(sampler, num_timesteps=num_timesteps)
        self.default_sampler.grid(self.diffusion)
        self.optimizer_spec = optimizer_spec(optimizer)  # checked now, not at fit time
        # The epoch's loss, overall and by timestep quartile; accumulated on the device, logged per epoch.
        self.epoch_losses = nn.ModuleDict({f"{stage}_losses": TimestepLosses(num_timesteps) for stage in STAGES})

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name around every hook call, ~45 times a training step; nn.Module's
        # __setattr__ (parameter/module/buffer bookkeeping) costs ~2 us each, a plain attribute 0.2 us.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        # Every stage (validate the published model, or fine-tune it); a checkpoint given to the trainer is
        # restored after setup and so takes precedence.
        if self.hparams.get("init_from") and not self._init_loaded:
            self.load_diffusers_weights(self.hparams.init_from)
            self._init_loaded = True

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2), shard the backbone over the data-parallel ranks.

        Lightning calls this hook under every strategy; only ModelParallelStrategy sets a device mesh.
        """
        shard_over_mesh(self.backbone, self.device_mesh)

    # -- batches and the denoiser --------------------------------------------------------------

    def _network(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        # The network runs in its weights' dtype (bf16-true, 16-true, module.half()); the sampler keeps its
        # state in at least float32 (see sample) and gets the output back in that dtype.
        dtype = self.network_dtype
        if self.use_channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        out = self.backbone(x_t.to(dtype), t, cond) if cond is not None else self.backbone(x_t.to(dtype), t)
        return out.to(x_t.dtype)

    @property
    def network_dtype(self) -> torch.dtype:
        """The dtype of the backbone's weights (float32 for a backbone without parameters)."""
        weight = next(self.backbone.parameters(), None)
        return torch.float32 if weight is None else weight.dtype

    def network(self, cond: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """The raw backbone as ``denoise_fn(x_t, t) -> output`` with class labels bound (for the losses)."""
        return lambda x_t, t: self._network(x_t, t, cond)

    def denoiser(self) -> Denoiser:
        """The model as samplers, guidance and bits/dim see it: ``denoiser(x_t, t, cond=None) -> Prediction``."""
        return Denoiser(self._network, self.diffusion)

    # -- steps ---------------------------------------------------------------------------------

    def _shared_step(self, batch: Any, stage: str, batch_idx: int) -> tuple[Tensor, Tensor]:
        """The (weighted) batch loss and the timesteps it was drawn at. No host synchronisation."""
        x0, labels = unpack_batch(batch, self.data_shape)
        # Reading the label values back is a host sync: do it on the first batch of each epoch only (an
        # out-of-range label later still fails, in the class embedding, with a less friendly message).
        labels = check_labels(labels, x0.shape[0], self.num_classes, values=batch_idx == 0)
        if batch_idx == 0:  # the data's range, read back once an epoch as the labels are
            check_image_range(x0)
        # Every draw comes from a generator seeded by (stage, step, micro-batch, rank), never from the
        # global RNG: validation losses are comparable between epochs, and a resumed run draws
        # exactly what the uninterrupted one would have.
        generator = self._generator(stage, batch_idx)
        if stage == "train":
            t, weights = self.timestep_sampler.sample(x0.shape[0], self.device, generator=generator)
            if labels is not None and self.num_classes is not None and self.cond_drop_prob > 0:
                labels = drop_labels(labels, self.cond_drop_prob, self.num_classes, generator)
        else:
            t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=self.device, generator=generator)
            weights = None
        terms = self.diffusion.training_losses(self.network(labels), x0, t, generator=generator)
        loss = (terms["loss"] if weights is None else terms["loss"] * weights).mean()
        if stage == "train" and isinstance(self.timestep_sampler, LossSecondMomentSampler):
            # Every rank must see the same losses so their timestep distributions agree.
            all_t, all_losses = self.all_gather(t), self.all_gather(terms["loss"].detach())
            assert isinstance(all_t, Tensor) and isinstance(all_losses, Tensor)  # a tensor gathers to a tensor
            self.timestep_sampler.update(all_t.reshape(-1), all_losses.reshape(-1))
        if stage == "train" and self._log_this_step():
            # A host copy, read back once here: Lightning's progress bar re-reads a logged step value at
            # every refresh until the epoch ends, which for a device tensor is a sync every step.
            self.log("train/loss_step", loss.detach().cpu(), prog_bar=True, on_step=True, on_epoch=False)
        self._epoch_losses(stage).update(terms["loss"], t, loss, terms.get("vlb"))
        return loss, t

    def _log_this_step(self) -> bool:
        """The steps a logger records (every ``log_every_n_steps``, and the first): the step loss is logged
        then only. ``self.log`` also costs ~0.5 ms a call on a CPU (it moves its record to the device)."""
        if self._trainer is None:
            return True
        step = self.global_step
        return step == 0 or (step + 1) % self.trainer.log_every_n_steps == 0  # type: ignore[attr-defined]  # set by Lightning

    def _generator(self, stage: str, batch_idx: int) -> torch.Generator:
        """A generator on the module's device for this step (see ``seeding.step_generator``)."""
        rank = self.global_rank if self._trainer is not None else 0
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return step_generator(stage, batch_idx, self.device, self.global_step, accumulate, rank)

    def _epoch_losses(self, stage: str) -> TimestepLosses:
        metric = self.epoch_losses[f"{stage}_losses"]
        assert isinstance(metric, TimestepLosses)
        return metric

    def _log_epoch(self, stage: str) -> None:
        log_epoch_losses(self, self._epoch_losses(stage), stage)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self.nonfinite.training_step(*self._shared_step(batch, "train", batch_idx), self)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val", batch_idx)[0]

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test", batch_idx)[0]

    # The non-finite guard's hooks (see nonfinite.py): skipped steps without a per-step host synchronisation.
    def on_train_start(self) -> None:
        self.nonfinite.on_train_start(self)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite.on_before_optimizer_step(optimizer, self)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.nonfinite.on_train_batch_end(self)

    def on_train_end(self) -> None:
        self.nonfinite.on_train_end(self)

    # -- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sampler: Sampler | str | dict[str, Any] | None = None,
        generator: Generators = None,
        labels: Tensor | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        x_T: Tensor | None = None,
        callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """Draw ``num_samples`` samples, shape ``(num_samples, *data_shape)``.

        Args:
            sampler: defaults to the module's ``sampler`` setting.
            generator: a generator on the module's device, for reproducible samples; or one per sample,
                so that sample i depends on ``generator[i]`` alone (not on the batch it is drawn in).
            labels: class labels for a class-conditional model (``None``: unconditional / null label).
            guidance_scale: classifier-free guidance w (default: the module's ``guidance_scale``).
            x_T: starting noise; drawn from ``generator`` when not given.
            callback: ``callback(step, num_steps, x, pred_x0)`` after every step (progress bars).
        """
        sampler = self._sampler(sampler)
        scale = check_sample_args(num_samples, self.data_shape, guidance_scale, self.guidance_scale, labels, x_T)
        model = conditioned(self.denoiser(), labels, num_samples, self.num_classes, scale, self.device)
        if x_T is None:  # in at least float32 (see initial_noise)
            x_T = initial_noise(num_samples, self.data_shape, generator, self.device, self.network_dtype)
        with evaluating(self):
            return sampler.sample(model, self.diffusion, x_T, generator=generator, callback=callback)

    @torch.no_grad()
    def edit(
        self,
        images: Tensor,
        strength: float,
        sampler: Sampler | str | dict[str, Any] | None = None,
        generator: Generators = None,
        labels: Tensor | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """SDEdit (Meng et al. 2022): ``images`` noised to the grid point ``strength`` in (0, 1] selects, then the
        rest of the sampler's grid (``Sampler.edit``). ``strength = 1`` is plain sampling from the fully noised
        input; with a deterministic sampler a small strength returns the input. Arguments as in :meth:`sample`;
        ``generator`` draws the noise first, then the sampler's own."""
        sampler = self._sampler(sampler)
        x0 = check_edit_images(images, self.data_shape, self.network_dtype).to(self.device)
        scale = check_sample_args(x0.shape[0], self.data_shape, guidance_scale, self.guidance_scale, labels, None)
        model = conditioned(self.denoiser(), labels, x0.shape[0], self.num_classes, scale, self.device)
        with evaluating(self):
            return sampler.edit(model, self.diffusion, x0, strength, generator=generator, callback=callback)

    @torch.no_grad()
    def inpaint(
        self,
        images: Tensor,
        mask: Tensor,
        sampler: Sampler | str | dict[str, Any] | None = None,
        generator: Generators = None,
        labels: Tensor | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """Complete ``images`` where ``mask`` is 0, keeping them where it is 1 (broadcastable to ``images``).

        ``sampler`` defaults to ``repaint`` (``RePaintSampler(250, jump_length=10, jump_n_sample=10)``, its
        steps capped at T); any other sampler inpaints by replacement (``Sampler.inpaint``). The starting noise
        is drawn from ``generator`` first, as in :meth:`sample`, so a mask of zeros is plain sampling with the
        same generator. Other arguments as in :meth:`sample`."""
        sampler = self._sampler("repaint" if sampler is None else sampler)
        x0 = check_edit_images(images, self.data_shape, self.network_dtype).to(self.device)
        mask = torch.as_tensor(mask).to(self.device)
        scale = check_sample_args(x0.shape[0], self.data_shape, guidance_scale, self.guidance_scale, labels, None)
        model = conditioned(self.denoiser(), labels, x0.shape[0], self.num_classes, scale, self.device)
        x_T = initial_noise(x0.shape[0], self.data_shape, generator, self.device, self.network_dtype)
        with evaluating(self):
            return sampler.inpaint(model, self.diffusion, x0, mask, generator=generator, callback=callback, x_T=x_T)

    def _sampler(self, spec: Sampler | str | dict[str, Any] | None) -> Sampler:
        """The module's ``sampler`` setting, or ``spec`` built with its default steps capped at T (as everywhere
        a sampler is named)."""
        return self.default_sampler if spec is None else make_sampler(spec, num_timesteps=self.diffusion.num_timesteps)

    def predict_step(self, batch: Any, batch_idx: int = 0) -> Tensor:
        """Generate one sample per request; a request batch is a dict with ``seed`` and optional ``labels``. Edit
        requests (``lightning_ddpm.data.EditRequestsDataModule``) also hold ``images`` and a ``mask`` (inpainting)
        or a ``strength`` (SDEdit), and optionally a ``sampler`` (JSON)."""
        if not isinstance(batch, dict) or "seed" not in batch:
            raise ValueError("predict batches are sample requests: a dict with 'seed' (and optional 'labels')")
        generators = request_generators(batch["seed"].tolist(), self.device)  # one per request
        if "images" in batch:
            return edit_request(self, batch, generators).cpu()
        return self.sample(len(generators), generator=generators, labels=batch.get("labels")).cpu()

    # -- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        return make_optimizer(
            self.optimizer_spec, [p for p in self.backbone.parameters() if p.requires_grad], self.lr_warmup_steps
        )

    # -- checkpoints ---------------------------------------------------------------------------

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> DiffusionModule:
        """Lightning's ``load_from_checkpoint`` after checking the file (clear error if truncated)."""
        check_local_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        is_global_zero = self._trainer is None or self.trainer.is_global_zero
        # the rank's device: Lightning restores a checkpoint before it moves the module there
        save_module_state(checkpoint, self.timestep_sampler, root_device(self._trainer, self.device), is_global_zero)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_loaded_checkpoint(checkpoint, self.hparams, COMPATIBLE_SETTINGS)
        # The checkpoint holds every weight: init_from must not put the published ones back at a later setup
        # (load_from_checkpoint, then Trainer.validate or predict), nor need its folder any more.
        self._init_loaded = True
        restore_module_state(checkpoint, self.timestep_sampler, self._trainer, self.device)
