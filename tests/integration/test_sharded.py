"""FSDP2 (Lightning's ModelParallelStrategy) with 2 CPU processes (gloo): the backbone is sharded,
EMA keeps a sharded average, sample pictures are drawn by every rank, checkpoints hold full tensors
and a resume from one continues exactly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lightning_ddpm import DiffusionModule
from lightning_ddpm.ema import list_snapshots
from lightning_ddpm.samplers import DDIMSampler
from tests.helpers import run_cli_process

ROOT = Path(__file__).resolve().parents[2]
MLP = {"name": "mlp", "init_args": {"hidden_dim": 16, "num_blocks": 2}}
FSDP2 = [
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.strategy.save_distributed_checkpoint=false",
]


def _fit(
    tmp: Path, strategy: list[str], max_steps: int, ckpt_path: Path | None = None, extra=(), extra_args=()
) -> None:
    callbacks = [
        *extra,
        {"class_path": "lightning_ddpm.callbacks.EMA", "init_args": {"decay": 0.9}},
        {
            "class_path": "lightning_ddpm.callbacks.PostHocEMA",
            "init_args": {"snapshot_every_n_steps": 3, "snapshot_dir": str(tmp / "phema"), "snapshot_dtype": "float32"},
        },
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": 3, "save_top_k": -1},
        },
        {
            "class_path": "lightning_ddpm.callbacks.SampleLogger",
            "init_args": {
                "every_n_steps": 3,
                "every_n_epochs": None,
                "num_samples": 10,
                "seed": 3,
                "output_dir": str(tmp / "pictures"),
                "sampler": {"class_path": "lightning_ddpm.samplers.DDIMSampler", "init_args": {"num_steps": 4}},
            },
        },
        {"class_path": "tests.helpers.DumpSamples", "init_args": {"dirpath": str(tmp / "dump")}},
        {"class_path": "tests.helpers.DumpShards", "init_args": {"dirpath": str(tmp / "dump")}},
    ]
    args = [
        "fit",
        "--config",
        str(ROOT / "configs/toy2d.yaml"),
        "--model.backbone",
        json.dumps(MLP),
        "--model.num_timesteps=50",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        *strategy,
        f"--trainer.max_steps={max_steps}",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=3",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp}",
        "--data.init_args.num_train=2048",
        "--trainer.callbacks",
        json.dumps(callbacks),
        *extra_args,
    ]
    run_cli_process(args + (["--ckpt_path", str(ckpt_path)] if ckpt_path is not None else []), cwd=tmp)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for key in a:
        tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-6}
        torch.testing.assert_close(a[key], b[key], **tol, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An FSDP2 run of 6 steps, the same run under DDP, and an FSDP2 run resumed at step 3. Pictures and a
    validation batch at steps 3 and 6 swap the EMA weights in and out mid-training: a swap that left the
    wrong weights behind would make the runs part ways."""
    tmp = {name: tmp_path_factory.mktemp(name) for name in ("fsdp", "ddp", "resumed")}
    _fit(tmp["fsdp"], FSDP2, 6)
    _fit(tmp["ddp"], ["--trainer.strategy=ddp"], 6)
    # the resumed run writes its snapshots into the checkpoint's folder: keep the uninterrupted run's to compare
    shutil.copytree(tmp["fsdp"] / "phema", tmp["resumed"] / "uninterrupted")
    for late in (tmp["fsdp"] / "phema").glob("phema-*-000000006-*.pt"):
        late.unlink()  # the resumed run must write these again
    _fit(tmp["resumed"], FSDP2, 6, ckpt_path=tmp["fsdp"] / "ckpt" / "epoch=0-step=3.ckpt")
    return tmp


def test_fsdp2_a_nan_in_one_ranks_shard_skips_the_step_on_every_rank(tmp_path):
    """Each rank sees only its shard of the gradients: the guard all-reduces the flag, or the rank
    without the NaN would update its shard while the other skipped."""
    poison = {
        "class_path": "tests.helpers.PoisonShardGrad",
        "init_args": {"rank": 0, "step": 1, "dirpath": str(tmp_path / "dump")},
    }
    _fit(tmp_path, FSDP2, 3, extra=[poison])
    for rank in (0, 1):
        record = json.loads((tmp_path / "dump" / f"poison_rank{rank}.json").read_text())
        assert record == {"1": True, "2": False}, f"rank {rank}: {record}"


def test_fsdp2_shards_the_backbone_and_its_ema_average(runs):
    shards = [json.loads((runs["fsdp"] / "dump" / f"shards_rank{r}.json").read_text()) for r in (0, 1)]
    for rank in shards:
        assert rank["sharded_units"] == 3  # the two residual blocks, then the backbone itself
        assert rank["local"] < rank["total"] and rank["ema_local"] == rank["local"]
    assert shards[0]["local"] + shards[1]["local"] >= shards[0]["total"]  # together the ranks hold it all


def test_fsdp2_trains_like_ddp_and_checkpoints_full_tensors(runs):
    """The checkpoint (EMA in state_dict, raw in current_model_state) holds full tensors and agrees
    with DDP's after 6 steps (reduce-scatter and all-reduce differ only in summation order)."""
    fsdp, ddp = (_load(runs[name] / "ckpt" / "epoch=1-step=6.ckpt") for name in ("fsdp", "ddp"))
    for key in ("state_dict", "current_model_state"):
        assert all(type(v) is torch.Tensor for v in fsdp[key].values()), key
        _assert_same(fsdp[key], ddp[key], exact=False)
    start = _load(runs["fsdp"] / "ckpt" / "epoch=0-step=3.ckpt")
    ema, raw = fsdp["state_dict"]["backbone.inp.weight"], fsdp["current_model_state"]["backbone.inp.weight"]
    assert not torch.equal(ema, raw) and not torch.equal(raw, start["current_model_state"]["backbone.inp.weight"])


def test_fsdp2_resume_continues_bit_for_bit(runs):
    whole, resumed = (_load(runs[name] / "ckpt" / "epoch=1-step=6.ckpt") for name in ("fsdp", "resumed"))
    for key in ("state_dict", "current_model_state"):
        _assert_same(whole[key], resumed[key], exact=True)
    assert whole["averaging_state"]["n_averaged"] == resumed["averaging_state"]["n_averaged"] == 6
    for a, b in zip(whole["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        _assert_same(a, b, exact=True)


def test_fsdp2_posthoc_ema_snapshots_are_full_tensors_and_agree_with_ddp(runs):
    fsdp, ddp = (list_snapshots(runs[name] / "phema") for name in ("fsdp", "ddp"))
    assert (
        [(s.step, s.sigma_rel) for s in fsdp]
        == [(s.step, s.sigma_rel) for s in ddp]
        == [(3, 0.05), (3, 0.1), (6, 0.05), (6, 0.1)]
    )
    module = DiffusionModule.load_from_checkpoint(runs["fsdp"] / "ckpt" / "epoch=1-step=6.ckpt")
    shapes = {name: p.shape for name, p in module.named_parameters()}
    for a, b in zip(fsdp, ddp):
        state = a.load()
        assert {k: v.shape for k, v in state.items()} == shapes
        assert all(type(v) is torch.Tensor for v in state.values())
        _assert_same(state, b.load(), exact=False)


def test_fsdp2_resume_continues_the_posthoc_ema_profiles_bit_for_bit(runs):
    whole, resumed = list_snapshots(runs["resumed"] / "uninterrupted"), list_snapshots(runs["fsdp"] / "phema")
    assert [s.path.name for s in whole] == [s.path.name for s in resumed]  # the same run id, the same folder
    for a, b in zip(whole, resumed):
        _assert_same(a.load(), b.load(), exact=True)
    assert not (runs["resumed"] / "phema").exists()


def test_fsdp2_sample_pictures_are_drawn_by_every_rank(runs):
    dump = runs["fsdp"] / "dump"
    rank0, rank1 = (torch.load(dump / f"samples_rank{r}.pt", weights_only=True) for r in (0, 1))
    # every rank ran each picture's 4 sampling steps (and the same validation passes)
    assert rank0["eval_calls"] == rank1["eval_calls"] >= 2 * 4
    assert (runs["fsdp"] / "pictures" / "step_0000006.png").exists()
    # one process from the final EMA weights (the checkpoint's state_dict), the same per-sample seeds;
    # (load_from_checkpoint also checks the digest, which rank 0 wrote over the gathered tensors)
    module = DiffusionModule.load_from_checkpoint(runs["fsdp"] / "ckpt" / "epoch=1-step=6.ckpt")
    alone = module.sample(
        10, sampler=DDIMSampler(num_steps=4), generator=[torch.Generator().manual_seed(3 + i) for i in range(10)]
    )
    torch.testing.assert_close(rank0["samples"], alone, rtol=1e-5, atol=1e-5)


def test_fsdp2_predict_gives_the_one_process_samples(runs, tmp_path):
    """`lightning-ddpm predict` under FSDP2 loads the gathered checkpoint into the sharded backbone; every
    rank samples its requests and the merged file equals one process's."""

    def predict(strategy: list[str], devices: int) -> torch.Tensor:
        out = tmp_path / f"p{devices}"
        run_cli_process(
            [
                "predict",
                "--config",
                str(ROOT / "configs/toy2d.yaml"),
                "--model.backbone",
                json.dumps(MLP),
                "--model.num_timesteps=50",
                "--ckpt_path",
                str(runs["fsdp"] / "ckpt" / "epoch=1-step=6.ckpt"),
                "--model.sampler",
                '{"name": "ddpm", "init_args": {"num_steps": 5}}',
                "--data.init_args.num_predict_samples=9",
                "--data.init_args.batch_size=4",  # odd: uneven ranks
                "--data.init_args.predict_seed=7",
                f"--trainer.devices={devices}",
                *strategy,
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

    sharded, one = predict(FSDP2[:-1], 2), predict([], 1)
    assert sharded.shape == one.shape == (9, 2)
    torch.testing.assert_close(sharded, one, rtol=1e-5, atol=1e-5)


def test_fsdp2_with_compile_trains_like_eager(runs, tmp_path):
    """`model.compile` (nn.Module.compile in place) composes with the sharding: the compiled run's checkpoint
    agrees with the eager run's, and the backbone really ran compiled. Its graph breaks only where FSDP2's
    unit hooks run (they are `torch._dynamo.disable`d: not traced), nowhere else."""
    _fit(tmp_path, FSDP2, 6, extra_args=["--model.compile=true"])
    eager, compiled = (
        _load(runs["fsdp"] / "ckpt" / "epoch=1-step=6.ckpt"),
        _load(tmp_path / "ckpt" / "epoch=1-step=6.ckpt"),
    )
    for key in ("state_dict", "current_model_state"):
        _assert_same(eager[key], compiled[key], exact=False)
    for rank in (0, 1):
        record = json.loads((tmp_path / "dump" / f"compile_rank{rank}.json").read_text())
        assert record["compiled_graphs"] >= 1, record
        assert record["reasons"] and all("torch._dynamo.disable()" in r for r in record["reasons"]), record


def test_sharding_helpers_leave_builds_without_torch_distributed_alone(monkeypatch):
    """Some torch builds lack torch.distributed (importing its fsdp/tensor modules fails there): the helpers that
    every run calls (EMA swaps and checkpoints, the non-finite guard) must then not import them."""
    from lightning_ddpm.backbones.sharding import full_tensor, is_sharded, reshard
    from lightning_ddpm.training.nonfinite import _shard_group

    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for name in ("torch.distributed.fsdp", "torch.distributed.tensor"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now raises ImportError
    net = torch.nn.Linear(2, 2)
    assert not is_sharded(net)
    reshard(net)
    assert _shard_group([torch.zeros(1)]) is None
    tensor = torch.ones(2)
    assert full_tensor(tensor) is tensor
