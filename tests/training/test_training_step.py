"""The training step under gradient accumulation, per-request predict seeds, RNG ownership, sampler
caches, host synchronisation, compile and the optimizer defaults (issue 15)."""

import gc
import json
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_ddpm import DDPMSampler, DiffusionModule, GaussianDiffusion, make_schedule
from lightning_ddpm.data import SampleRequests
from tests.helpers import run_cli_process

ROOT = Path(__file__).resolve().parents[2]
MLP = {"name": "mlp", "init_args": {"hidden_dim": 16, "num_blocks": 1}}
LIBRARY = str(ROOT / "lightning_ddpm")


def _loader(n=16, batch=16, labels=False):
    g = torch.Generator().manual_seed(0)
    items = [torch.randn(batch, 2, generator=g) for _ in range(n)]
    if labels:
        items = [(x, torch.randint(0, 3, (batch,), generator=g)) for x in items]
    return torch.utils.data.DataLoader(items, batch_size=None)


def _trainer(tmp_path, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return Trainer(
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, **kw
    )


def test_accumulated_micro_batches_draw_their_own_timesteps_and_noise(tmp_path):
    module = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=1000, parameterization="v")
    draws = []
    real = module.diffusion.training_losses

    def recording(denoise_fn, x0, t, noise=None, generator=None):
        out = real(denoise_fn, x0, t, noise, generator)
        draws.append((module.global_step, t.clone(), torch.randn(4, generator=generator)))
        return out

    module.diffusion.training_losses = recording
    _trainer(tmp_path, max_steps=3, accumulate_grad_batches=4).fit(module, _loader(n=12))
    assert [step for step, _, _ in draws] == [0] * 4 + [1] * 4 + [2] * 4
    for step in range(3):
        ts = [t for s, t, _ in draws if s == step]
        noises = [z for s, _, z in draws if s == step]
        assert all(not torch.equal(ts[0], t) for t in ts[1:]) and all(not torch.equal(noises[0], z) for z in noises[1:])
        # 4 micro-batches of 16 are 64 independent uniform draws over 1000 timesteps, as one batch of
        # 64 would be: about 62 distinct values (at most 16 if every micro-batch repeated the first)
        assert torch.cat(ts).unique().numel() > 50


def _predict(module, tmp_path, batch_size, sampler):
    module.default_sampler = sampler
    loader = torch.utils.data.DataLoader(SampleRequests(8, seed=5), batch_size=batch_size)
    return torch.cat(_trainer(tmp_path).predict(module, loader))


def test_a_predict_request_depends_on_its_seed_alone(tmp_path):
    torch.manual_seed(0)
    module = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=50, parameterization="v")
    sampler = DDPMSampler(num_steps=10)  # noise at every step, not just at the start
    one_by_one = _predict(module, tmp_path, 1, sampler)
    in_eights = _predict(module, tmp_path, 8, sampler)
    in_threes = _predict(module, tmp_path, 3, sampler)
    torch.testing.assert_close(in_eights, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_threes, one_by_one, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(one_by_one[0], one_by_one[1])  # and different seeds differ


def test_predict_request_i_is_sampled_from_predict_seed_plus_i(tmp_path):
    from lightning_ddpm.callbacks import SampleWriter
    from lightning_ddpm.data import Toy2DDataModule

    torch.manual_seed(0)
    module = DiffusionModule(
        backbone=MLP,
        data_shape=[2],
        num_timesteps=20,
        parameterization="v",
        sampler={"name": "ddpm", "init_args": {"num_steps": 5}},
    )  # noise at every step
    data = Toy2DDataModule(num_train=64, batch_size=2, num_predict_samples=5, predict_seed=7)
    writer = SampleWriter(output_dir=str(tmp_path / "out"))
    _trainer(tmp_path, callbacks=[writer]).predict(module, datamodule=data)
    written = torch.load(tmp_path / "out" / "samples.pt", weights_only=True)["samples"]
    alone = torch.cat([module.sample(1, generator=[torch.Generator().manual_seed(7 + i)]) for i in range(5)])
    torch.testing.assert_close(written, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(written, module.sample(5, generator=[torch.Generator().manual_seed(i) for i in range(5)]))


def test_predict_merge_keeps_each_padded_request_once_in_request_order(tmp_path):
    """Lightning shares predict requests out without repeats, but a DistributedSampler of the user's own
    pads the ranks evenly (9 requests: rank 1 repeats request 0): the merge keeps each request once."""
    from types import SimpleNamespace

    from lightning_ddpm.callbacks import SampleWriter

    samples = torch.arange(9.0).unsqueeze(1).repeat(1, 2)  # request i's sample is (i, i)
    for rank, indices in enumerate([[0, 2, 4, 6, 8], [1, 3, 5, 7, 0]]):
        torch.save({"indices": torch.tensor(indices), "samples": samples[indices]}, tmp_path / f".shard_rank{rank}.pt")
    trainer = SimpleNamespace(world_size=2, predict_dataloaders=None, datamodule=None)
    SampleWriter(output_dir=str(tmp_path))._merge(trainer, tmp_path)
    merged = torch.load(tmp_path / "samples.pt", weights_only=True)
    torch.testing.assert_close(merged["samples"], samples, rtol=0, atol=0)
    assert not list(tmp_path.glob(".shard_rank*.pt"))


def test_predict_with_two_processes_gives_the_one_process_samples(tmp_path):
    def run(devices: int) -> torch.Tensor:
        out = tmp_path / f"p{devices}"
        run_cli_process(
            [
                "predict",
                "--config",
                str(ROOT / "configs/toy2d.yaml"),
                "--model.backbone",
                json.dumps(MLP),
                "--model.num_timesteps=50",
                "--untrained",
                "--model.sampler",
                '{"name": "ddpm", "init_args": {"num_steps": 5}}',
                "--data.init_args.num_predict_samples=9",
                "--data.init_args.batch_size=4",  # odd: uneven ranks
                "--data.init_args.predict_seed=7",
                f"--trainer.devices={devices}",
                "--trainer.strategy=ddp",
                "--trainer.accelerator=cpu",
                "--trainer.logger=false",
                "--trainer.callbacks=[]",
                f"--trainer.default_root_dir={out}",
                "--predict_writer.output_dir",
                str(out),
            ],
            cwd=tmp_path,
        )
        return torch.load(out / "samples.pt", weights_only=True)["samples"]

    two, one = run(2), run(1)
    assert two.shape == one.shape == (9, 2)  # each request exactly once ...
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)  # ... in request order


def test_load_from_checkpoint_leaves_the_callers_global_rng_alone(tmp_path):
    module = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20, parameterization="v")
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, _loader())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    torch.manual_seed(123)
    DiffusionModule.load_from_checkpoint(tmp_path / "m.ckpt")
    after_load = torch.rand(3)
    torch.manual_seed(123)
    DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20, parameterization="v")  # the same construction
    assert torch.equal(after_load, torch.rand(3)), "loading must not restore the training run's RNG state"


def test_a_shared_ddpm_sampler_follows_each_live_models_schedule():
    sampler = DDPMSampler(num_steps=5)
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    live = [GaussianDiffusion(make_schedule(name, 20), parameterization="v") for name in ("cosine", "sigmoid")]
    for d in (*live, *live):  # in turn: a cache that ignored which model it was built for would fail here
        ours = sampler.sample(lambda x, t: torch.zeros_like(x), d, x_T, generator=torch.Generator().manual_seed(1))
        alone = DDPMSampler(num_steps=5).sample(
            lambda x, t: torch.zeros_like(x), d, x_T, generator=torch.Generator().manual_seed(1)
        )
        torch.testing.assert_close(ours, alone, rtol=0, atol=0)


def test_a_shared_ddpm_sampler_never_uses_another_models_schedule():
    sampler = DDPMSampler(num_steps=5)
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))

    def run(d):
        return sampler.sample(lambda x, t: torch.zeros_like(x), d, x_T, generator=torch.Generator().manual_seed(1))

    def fresh(d):
        return DDPMSampler(num_steps=5).sample(
            lambda x, t: torch.zeros_like(x), d, x_T, generator=torch.Generator().manual_seed(1)
        )

    first = GaussianDiffusion(make_schedule("linear", 20, beta_end=0.3), parameterization="v")
    run(first)
    old_id = id(first)
    del first
    gc.collect()
    for _ in range(200):  # CPython usually hands the freed id to the next object of that size
        second = GaussianDiffusion(make_schedule("cosine", 20), parameterization="v")
        if id(second) == old_id:
            break
    else:
        pytest.skip("CPython did not reuse the freed id: the id-reuse case was not exercised")
    torch.testing.assert_close(run(second), fresh(second), rtol=0, atol=0)


TORCH = str(Path(torch.__file__).parent)


def _library_call(frame) -> str | None:
    """Where library code made (or had a torch helper make) the read-back at ``frame``, else None.

    Walks outwards over torch frames (a torch helper such as AveragedModel.update_parameters counts for
    the library code that called it), and counts a frame of the library, or of a Lightning base class
    method running on a library object (WeightAveraging.on_train_batch_end on our EMA, say)."""
    while frame is not None:
        code, owner = frame.f_code, frame.f_locals.get("self")
        if code.co_filename.startswith(LIBRARY) or type(owner).__module__.startswith("lightning_ddpm"):
            return f"{code.co_filename}:{code.co_name}"
        if not code.co_filename.startswith(TORCH):
            return None
        frame = frame.f_back
    return None


class _CountHostSyncs(Callback):
    """Counts Tensor.item / __bool__ / tolist / cpu / numpy / __int__ / __float__ calls made from library
    code, directly or through the torch helpers it calls, in training batches 1 .. steps - 1, end hooks
    included (the first batch of an epoch checks the label values once)."""

    NAMES = ("item", "__bool__", "tolist", "cpu", "numpy", "__int__", "__float__")

    def __init__(self, steps: int) -> None:
        self.steps, self.calls, self.active = steps, [], False

    def setup(self, trainer, pl_module, stage):
        self.originals = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, self._wrap(name, original))

    def teardown(self, trainer, pl_module, stage):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, name, original):
        callback = self

        def wrapper(tensor, *args, **kwargs):
            if callback.active:
                where = _library_call(sys._getframe(1))
                if where is not None:
                    callback.calls.append(f"{name} at {where}")
            return original(tensor, *args, **kwargs)

        return wrapper

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # stays on through the batch's end hooks: Lightning calls the module's on_train_batch_end (where the
        # non-finite counts may be read back) after the callbacks'
        self.active = 0 < trainer.global_step < self.steps

    def on_train_epoch_end(self, trainer, pl_module):
        self.active = False  # once an epoch, reading back the epoch's losses is the point

    def on_train_end(self, trainer, pl_module):
        self.active = False  # the end-of-fit read-back of the non-finite counts is allowed


@pytest.mark.parametrize("timestep_sampler", ["uniform", "loss_second_moment"])
def test_training_steps_make_no_host_syncs(tmp_path, timestep_sampler):
    from lightning_ddpm.callbacks import EMA

    module = DiffusionModule(
        backbone=MLP,
        data_shape=[2],
        num_classes=3,
        num_timesteps=50,
        parameterization="v",
        timestep_sampler=timestep_sampler,
        loss="hybrid",
        variance="learned_range",
    )
    counter = _CountHostSyncs(steps=20)
    _trainer(tmp_path, max_steps=20, callbacks=[EMA(decay=0.9), counter], log_every_n_steps=50).fit(
        module, _loader(n=20, labels=True)
    )
    assert module.nonfinite.on_device  # fused Adam: the device path
    assert counter.calls == [], counter.calls[:10]


def test_posthoc_ema_updates_make_no_host_syncs(tmp_path):
    """docs/callbacks.md: PostHocEMA's per-step update is one fused lerp per profile on the device, with no host
    synchronisation. The counter comes first among the callbacks so that it stops before the end-of-fit
    snapshot (a copy to the host, periodic work like the snapshots every N steps)."""
    from lightning_ddpm.callbacks import PostHocEMA
    from lightning_ddpm.ema import list_snapshots

    module = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=50, parameterization="v")
    counter = _CountHostSyncs(steps=20)
    posthoc = PostHocEMA((0.05, 0.10), snapshot_every_n_steps=1000, snapshot_dir=str(tmp_path / "phema"))
    _trainer(tmp_path, max_steps=20, callbacks=[counter, posthoc], log_every_n_steps=50).fit(module, _loader(n=20))
    assert counter.calls == [], counter.calls[:10]
    assert [(s.step, s.sigma_rel) for s in list_snapshots(tmp_path / "phema")] == [(20, 0.05), (20, 0.10)]


def test_compile_option_compiles_the_backbone_without_graph_breaks(tmp_path):
    module = DiffusionModule(
        backbone=MLP,
        data_shape=[2],
        num_timesteps=20,
        parameterization="v",
        compile={"backend": "eager", "fullgraph": True},
    )  # fullgraph: a graph break raises
    plain = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20, parameterization="v")
    assert module.backbone._compiled_call_impl is not None
    assert module.state_dict().keys() == plain.state_dict().keys()  # no _orig_mod. prefixes in checkpoints
    _trainer(tmp_path, max_steps=2).fit(module, _loader())
    assert module.sample(4, generator=torch.Generator().manual_seed(0)).shape == (4, 2)


def test_adam_is_fused_and_ddp_skips_the_schedule_buffers(tmp_path):
    module = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20, parameterization="v")
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, _loader())
    assert trainer.optimizers[0].defaults["fused"] is True
    buffers = dict(module.named_buffers())
    assert module._ddp_params_and_buffers_to_ignore and all(
        n in buffers for n in module._ddp_params_and_buffers_to_ignore
    )
    assert not any(n.startswith("backbone.") for n in module._ddp_params_and_buffers_to_ignore)
    user = DiffusionModule(
        backbone=MLP,
        data_shape=[2],
        num_timesteps=20,
        parameterization="v",
        optimizer={"name": "torch.optim.Adam", "init_args": {"lr": 1e-3, "foreach": True}},
    )
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(user, _loader())
    assert not trainer.optimizers[0].defaults["fused"]  # the user's choice stands
    assert not user.nonfinite.on_device  # and the guard falls back to the host


def test_the_step_loss_is_logged_as_a_host_copy_on_logging_steps_only(tmp_path):
    """With a progress bar too: the bar re-reads a logged step value at every refresh, which for a device
    tensor is a host sync every step on a GPU (tests/integration/test_cuda.py checks that on CUDA)."""
    module = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20)
    logged, log = [], module.log

    def spy(name, value, *args, **kwargs):
        if name == "train/loss_step":
            logged.append((module.global_step, value.device.type, value.requires_grad))
        return log(name, value, *args, **kwargs)

    module.log = spy
    Trainer(
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=4,
        default_root_dir=tmp_path,
    ).fit(module, _loader(n=12))
    assert logged == [(step, "cpu", False) for step in (0, 3, 7, 11)]


def test_a_ddpm_sampler_follows_changes_to_its_grid():
    """num_steps and spacing are plain attributes: after a change the sampler steps through the new grid's
    respaced process (the cache once ignored the grid: old grid, or IndexError for more steps)."""
    d = GaussianDiffusion(make_schedule("cosine", 20), parameterization="v")
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    sampler = DDPMSampler(num_steps=5)
    sampler.sample(zero, d, x_T, generator=torch.Generator().manual_seed(1))
    for num_steps, spacing in ((5, "trailing"), (7, "trailing"), (3, "linspace"), (5, "leading")):
        sampler.num_steps, sampler.spacing = num_steps, spacing
        ours = sampler.sample(zero, d, x_T, generator=torch.Generator().manual_seed(1))
        fresh = DDPMSampler(num_steps=num_steps, spacing=spacing).sample(
            zero, d, x_T, generator=torch.Generator().manual_seed(1)
        )
        torch.testing.assert_close(ours, fresh, rtol=0, atol=0, msg=f"{num_steps} {spacing}")
