"""README statements that an audit found untested: defaults in its tables, what a checkpoint holds,
sampler identities it states, batch forms, guidance's single forward pass, the loss choices."""

from __future__ import annotations

import inspect

import pytest
import torch

from lightning_ddpm import DiffusionModule, GaussianDiffusion, make_schedule
from lightning_ddpm.callbacks import EMA
from lightning_ddpm.core.denoiser import Denoiser
from lightning_ddpm.core.guidance import guided_denoiser
from lightning_ddpm.data.batches import unpack_batch
from lightning_ddpm.samplers import DDIMSampler, make_sampler
from lightning_ddpm.training.checkpoints import DIGEST_KEY

MLP = {"name": "mlp", "init_args": {"hidden_dim": 8, "num_blocks": 1}}
UNET = {"name": "unet", "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4]}}


def _default(callable_, name):
    return inspect.signature(callable_).parameters[name].default


def test_the_sampler_table_defaults():
    """README "Samplers" table: default steps and spacing of every registered sampler, read from the table."""
    import re

    from lightning_ddpm.samplers import SAMPLERS
    from tests.helpers import documentation

    rows = dict(re.findall(r"^\| `(\w+)` \| `\w+[^|]*` \|(.*)$", documentation(), flags=re.M))
    assert set(rows) == set(SAMPLERS.names()), "one table row per registered sampler"
    for name, row in rows.items():
        steps = re.search(r"default (?:N = )?(\d+|all T)", row)[1]
        expected_steps = None if steps == "all T" else int(steps)
        expected_spacing = re.search(r"\((\w+)\) \|\s*$", row)[1]
        sampler = make_sampler(name)
        assert (sampler.num_steps, sampler.spacing) == (expected_steps, expected_spacing), name
    assert make_sampler("ddim").eta == 0.0
    unipc = make_sampler("unipc")
    assert (unipc.order, unipc.corrector) == (2, True)


def test_documented_option_defaults():
    assert _default(EMA, "decay") == 0.9999
    assert _default(DiffusionModule, "cond_drop_prob") == 0.1
    assert _default(DiffusionModule, "max_nonfinite_steps") == 10
    assert _default(DiffusionModule, "sampler") == "ddim"


def test_the_backbone_holds_every_weight_and_the_schedule_stays_float64_when_cast():
    """README: schedule constants are non-persistent float64 buffers, never sharded into the optimizer;
    the backbone is the only module with parameters; a cast module keeps them float64."""
    module = DiffusionModule(backbone=UNET, data_shape=[1, 8, 8], num_timesteps=20)
    assert all(key.startswith("backbone.") for key in module.state_dict())
    assert all(name.startswith("backbone.") for name, _ in module.named_parameters())
    buffers = dict(module.diffusion.named_buffers())
    assert buffers and all(b.dtype == torch.float64 for b in buffers.values())
    for dtype in (torch.float16, torch.bfloat16):
        cast = DiffusionModule(backbone=UNET, data_shape=[1, 8, 8], num_timesteps=20).to(dtype)
        assert next(cast.backbone.parameters()).dtype == dtype
        assert all(b.dtype == torch.float64 for _, b in cast.diffusion.named_buffers()), dtype


def test_euler_is_ddim_on_the_trailing_grid_and_unip2_is_dpm_solver_pp_2m():
    """README: euler (= ddim trailing); UniP-2 with B(h) = e^h - 1 is DPM-Solver++(2M)."""
    d = GaussianDiffusion(make_schedule("cosine", 50), parameterization="v")
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    model = Denoiser(lambda x, t: net(torch.cat([x, t[:, None].double() / 50], 1)), d)
    x_T = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(spec):
        return make_sampler(spec).sample(model, d, x_T)

    for n in (5, 10):
        torch.testing.assert_close(
            run({"name": "euler", "init_args": {"num_steps": n}}),
            DDIMSampler(num_steps=n, spacing="trailing").sample(model, d, x_T),
            rtol=0,
            atol=1e-12,
        )
        torch.testing.assert_close(
            run({"name": "unipc", "init_args": {"num_steps": n, "corrector": False}}),
            run({"name": "dpmpp_2m", "init_args": {"num_steps": n}}),
            rtol=0,
            atol=1e-12,
        )
    # the identities are not trivial: the corrector and the second order change the result
    assert not torch.allclose(
        run({"name": "unipc", "init_args": {"num_steps": 5}}),
        run({"name": "dpmpp_2m", "init_args": {"num_steps": 5}}),
        atol=1e-6,
    )
    assert not torch.allclose(
        run({"name": "euler", "init_args": {"num_steps": 5}}),
        run({"name": "dpmpp_2m", "init_args": {"num_steps": 5}}),
        atol=1e-6,
    )


@pytest.mark.parametrize("keys", [("x", "y"), ("image", "label"), ("images", "labels")])
def test_dict_batches_take_every_documented_key(keys):
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    got_x, got_y = unpack_batch({keys[0]: x, keys[1]: y}, (1, 8, 8))
    assert got_x is x and got_y is y


@pytest.mark.parametrize("scale, batches", [(0.0, [3]), (1.0, [3]), (2.5, [6])])
def test_guidance_makes_one_batched_forward_pass(scale, batches):
    """README: conditional and unconditional predictions come from one forward pass of 2B examples
    (w = 0 and w = 1 need one of the two, B examples)."""
    d = GaussianDiffusion(make_schedule("linear", 20), parameterization="eps")
    calls = []

    def backbone(x, t, cond):
        calls.append(x.shape[0])
        return torch.zeros_like(x) + cond[:, None].float()

    model = guided_denoiser(Denoiser(backbone, d), torch.tensor([0, 1, 2]), null_label=3, guidance_scale=scale)
    model(torch.randn(3, 2), torch.tensor([5, 5, 5]))
    assert calls == batches


def test_vlb_loss_is_the_bounds_term_at_the_sampled_t():
    """README: loss="vlb" minimises the bound's term at the sampled t (bits/dim); hybrid adds it to L_simple."""
    kw = {"parameterization": "eps", "variance": "learned_range"}
    vlb = GaussianDiffusion(make_schedule("linear", 20, beta_end=0.3), loss="vlb", **kw)
    x0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 3, 7, 12, 19])
    out = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    losses = vlb.training_losses(lambda x_t, t_: out, x0, t, noise=noise)
    x_t = vlb.q_sample(x0, t, noise)
    torch.testing.assert_close(losses["loss"], vlb.vlb_terms(out, x0, x_t, t), rtol=1e-12, atol=0)
    losses["loss"].sum().backward()
    assert out.grad[:, :2].abs().sum() > 0 and out.grad[:, 2:].abs().sum() > 0  # mean and variance both learn


def test_checkpoints_without_a_digest_load_unchecked(tmp_path):
    """README: checkpoints written by other code (no digest) load without the integrity check."""
    from lightning.pytorch import Trainer

    module = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20)
    trainer = Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=8))
    trainer.save_checkpoint(tmp_path / "with.ckpt")
    checkpoint = torch.load(tmp_path / "with.ckpt", weights_only=False)
    key = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 1.0  # a change the digest would catch
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    with pytest.raises(ValueError, match="is corrupt: its tensors do not match the digest"):
        DiffusionModule.load_from_checkpoint(tmp_path / "tampered.ckpt")
    del checkpoint[DIGEST_KEY]
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    loaded = DiffusionModule.load_from_checkpoint(tmp_path / "foreign.ckpt")
    torch.testing.assert_close(loaded.state_dict()[key], checkpoint["state_dict"][key], rtol=0, atol=0)


def test_a_checkpoint_must_agree_on_classes_and_data_shape(tmp_path):
    """README: the model settings that give the weights their meaning (classes, data shape, ...) must
    agree with a checkpoint given to --ckpt_path; the check names each one that differs."""
    cond = DiffusionModule(backbone=MLP, data_shape=[2], num_classes=3, num_timesteps=20)
    checkpoint = {"state_dict": cond.state_dict(), "hyper_parameters": dict(cond.hparams)}
    plain = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20)
    with pytest.raises(ValueError, match=r"incompatible config: num_classes: checkpoint 3 vs this model None"):
        plain.on_load_checkpoint(checkpoint)
    wide = DiffusionModule(backbone=MLP, data_shape=[3], num_classes=3, num_timesteps=20)
    with pytest.raises(ValueError, match=r"data_shape: checkpoint \[2\] vs this model \[3\]"):
        wide.on_load_checkpoint(checkpoint)
    DiffusionModule(backbone=MLP, data_shape=[2], num_classes=3, num_timesteps=20).on_load_checkpoint(checkpoint)


@pytest.mark.filterwarnings("ignore:Metric .* will save all extracted features")
def test_fid_passes_the_offline_inception_weights_path_to_every_metric(monkeypatch):
    """README: FID offline with `inception_weights_path` (torch-fidelity's file, downloaded beforehand)."""
    import torchmetrics.image.fid

    from lightning_ddpm.callbacks import FIDCallback

    built = []

    class FakeInception(torch.nn.Module):
        num_features = 8

        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            built.append((name, features_list, feature_extractor_weights_path))

        def forward(self, x):
            return torch.zeros(x.shape[0], 8)

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", FakeInception)
    FIDCallback(
        num_samples=10, inception_weights_path="/weights/inception.pth", kid=True, inception_score=True
    ).build_metrics()
    assert built == [
        ("inception-v3-compat", [f], "/weights/inception.pth") for f in ("2048", "2048", "logits_unbiased")
    ]


def test_a_bare_sampler_name_works_in_sample_on_a_short_schedule():
    """README: a sampler name is usable wherever a sampler is accepted; its default steps are capped at T."""
    module = DiffusionModule(backbone=MLP, data_shape=[2], num_timesteps=20)
    for name in ("ddim", "dpmpp_2m", "unipc"):  # defaults 50 / 20 / 20 steps
        assert module.sample(3, sampler=name, generator=torch.Generator().manual_seed(0)).shape == (3, 2)


def test_the_model_contract_is_public_and_loads_without_lightning():
    import subprocess
    import sys

    code = (
        "import sys, lightning_ddpm as L; L.Denoiser, L.Prediction, L.make_sampler; "
        "assert not any(m.startswith('lightning.') or m == 'lightning' for m in sys.modules), 'Lightning loaded'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_configs_digits_yaml_is_the_recipe_ablation_row_it_names():
    # docs/benchmarks.md ("Recipe ablation") reports configs/digits.yaml as the row v_sigmoid_g8_film_no_zero of
    # benchmarks/digits_quality.py, trained as that benchmark trains (EMA 0.999, clipping 1, batch 64)
    from pathlib import Path

    import yaml

    from benchmarks.digits_quality import COMMON, CONFIGS, DIGITS_YAML_ROW

    config = yaml.safe_load((Path(__file__).parents[2] / "configs/digits.yaml").read_text())
    assert DIGITS_YAML_ROW == "v_sigmoid_g8_film_no_zero"
    description, settings = CONFIGS[DIGITS_YAML_ROW]
    assert "(configs/digits.yaml)" in description
    assert [name for name, (text, _) in CONFIGS.items() if "(configs/digits.yaml)" in text] == [
        "v_sigmoid_g8_film_no_zero"
    ]
    row = {**COMMON, **settings}
    defaults = inspect.signature(DiffusionModule).parameters
    for key, value in row.items():
        if key == "data_shape":
            continue  # the config takes it from the data module
        assert config["model"].get(key, defaults[key].default) == value, key
    ema = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(".EMA")]
    assert [c["init_args"]["decay"] for c in ema] == [0.999]
    assert config["trainer"]["gradient_clip_val"] == 1.0 and config["data"]["init_args"]["batch_size"] == 64


def test_the_peer_choice_rows_change_only_their_unet_option():
    # docs/benchmarks.md ("Recipe ablation"): the 7x7, final ResBlock and no-zero-init rows are configs/digits.yaml's
    # recipe (v_sigmoid_g8_film) with one U-Net option changed, and "all three" with the three
    from benchmarks.digits_quality import CONFIGS

    base = CONFIGS["v_sigmoid_g8_film"][1]
    changes = {
        "v_sigmoid_g8_film_k7": {"conv_in_kernel": 7},
        "v_sigmoid_g8_film_final": {"final_res_block": True},
        "v_sigmoid_g8_film_no_zero": {"zero_init": False},
        "v_sigmoid_g8_film_peer3": {"conv_in_kernel": 7, "final_res_block": True, "zero_init": False},
    }
    for name, change in changes.items():
        settings = CONFIGS[name][1]
        assert {k: v for k, v in settings.items() if k != "backbone"} == {
            k: v for k, v in base.items() if k != "backbone"
        }
        assert settings["backbone"]["name"] == base["backbone"]["name"] == "unet"
        assert settings["backbone"]["init_args"] == {**base["backbone"]["init_args"], **change}, name


def test_the_which_sampler_table_lists_each_config_under_its_parameterization():
    # docs/own_images.md, "Rule of thumb": the configs column of each row names configs of that row's prediction
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).parents[2]
    table = (root / "docs/own_images.md").read_text().split("| network predicts |", 1)[1].split("\n\n", 1)[0]
    seen = set()
    for line in table.splitlines()[2:]:
        predicts, _, _, configs = (cell.strip() for cell in line.strip("|").split("|"))
        allowed = {"v", "x0"} if predicts.startswith("v") else {"eps"}
        for name in re.findall(r"\b([a-z0-9_]+)(?: \(|,|$)", configs):
            config = yaml.safe_load((root / f"configs/{name}.yaml").read_text())
            assert config["model"].get("parameterization", "eps") in allowed, (name, predicts)
            seen.add(name)
    assert {"digits", "toy2d", "cifar10_ddpm", "cifar10_iddpm"} <= seen
