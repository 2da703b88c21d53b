import importlib.metadata
import runpy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_ddpm import available_backbones, build_backbone, register_backbone
from lightning_ddpm.backbones import MLP, UNet, registry
from tests.helpers import documentation

ROOT = Path(__file__).resolve().parents[2]

# Small settings per built-in backbone; a newly registered one is checked with its defaults.
TINY = {
    "unet": {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,), "image_size": 8},
    "mlp": {"hidden_dim": 32, "num_blocks": 2},
}
SHAPES = {"unet": (3, 8, 8), "mlp": (2,)}


def _build_tiny(name: str, **kw) -> nn.Module:
    shape = SHAPES.get(name, (3, 8, 8))
    return build_backbone(name, defaults={"in_channels": shape[0]}, **{**TINY.get(name, {}), **kw})


@pytest.mark.parametrize("name", available_backbones())
@pytest.mark.parametrize("learned", [False, True])
def test_backbone_contract(name, learned):
    shape = SHAPES.get(name, (3, 8, 8))
    net = _build_tiny(name, out_channels=shape[0] * (2 if learned else 1))
    x = torch.randn(4, *shape)
    t = torch.tensor([0, 1, 500, 999])
    out = net(x, t)
    assert out.shape == (4, shape[0] * (2 if learned else 1), *shape[1:]) and out.dtype == x.dtype
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def _perturbed(net: torch.nn.Module) -> torch.nn.Module:
    """The output layers start at zero (Ho et al.): perturb every weight so that outputs carry information."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


@pytest.mark.parametrize("name", ["unet", "mlp"])
def test_class_conditioning_and_null_label(name):
    net = _perturbed(_build_tiny(name, num_classes=3).eval())
    x, t = torch.randn(3, *SHAPES[name]), torch.tensor([5, 5, 5])
    a, b = net(x, t, torch.tensor([0, 1, 2])), net(x, t)
    null = net(x, t, torch.full((3,), 3))  # cond=None is the extra "null" label
    assert b.abs().max() > 1e-3  # a zero output would make the next check vacuous
    torch.testing.assert_close(b, null)
    # the class embedding is live: a label changes the output
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="one class label per example"):
        net(x, t, torch.tensor([[0], [1], [2]]))
    with pytest.raises(ValueError, match="without num_classes"):
        _build_tiny(name)(x, t, torch.tensor([0, 1, 2]))
    assert a.shape == x.shape


def test_unet_cifar10_has_the_papers_size():
    # Ho et al. 2020 report 35.7M parameters; the reference TF code's model has exactly this many.
    assert sum(p.numel() for p in UNet().parameters()) == 35_746_307


@pytest.mark.parametrize(
    "channels, size, kwargs",
    [
        (1, (28, 28), {"ch_mult": (1, 2, 2), "attn_resolutions": (14,)}),
        (3, (16, 24), {"ch_mult": (1, 2), "attn_resolutions": (8,)}),
        (1, (8, 32), {"ch_mult": (1, 2, 2, 2), "attn_resolutions": ()}),
    ],
)
def test_unet_shapes(channels, size, kwargs):
    net = UNet(in_channels=channels, image_size=size, ch=32, num_res_blocks=1, **kwargs)
    x = torch.randn(2, channels, *size)
    assert net(x, torch.tensor([3, 7])).shape == x.shape
    learned = UNet(
        in_channels=channels,
        out_channels=2 * channels,
        image_size=size,
        ch=32,
        num_res_blocks=1,
        num_classes=10,
        **kwargs,
    )
    assert learned(x, torch.tensor([3, 7]), torch.tensor([1, 9])).shape == (2, 2 * channels, *size)


def test_unet_options_and_errors():
    with pytest.raises(ValueError, match=r"image_size 30x30 is not divisible by 2\^\(len\(ch_mult\)-1\) = 8"):
        UNet(image_size=30)
    with pytest.raises(ValueError, match=r"attn_resolutions \[64\] are not feature-map heights"):
        UNet(image_size=32, attn_resolutions=(64,))
    with pytest.raises(ValueError, match="not divisible by norm_groups=32"):
        UNet(ch=48)
    net = UNet(ch=32, ch_mult=(1, 2), image_size=8, attn_resolutions=(8,), num_head_channels=8, scale_shift_norm=True)
    assert net.down[0][1].num_heads == 4
    with pytest.raises(ValueError, match="not divisible by 2"):
        net(torch.randn(1, 3, 9, 8), torch.tensor([0]))


DIGITS_UNET = {
    "in_channels": 1,
    "image_size": 8,
    "ch": 32,
    "ch_mult": (1, 2),
    "num_res_blocks": 1,
    "attn_resolutions": (4,),
    "norm_groups": 8,
}


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_unet_conv_in_kernel_keeps_the_image_size(kernel):
    net = UNet(**DIGITS_UNET, conv_in_kernel=kernel)
    assert net.conv_in.weight.shape == (32, 1, kernel, kernel)
    x = torch.randn(2, 1, 8, 8)
    assert net(x, torch.tensor([3, 7])).shape == x.shape
    with pytest.raises(ValueError, match="conv_in_kernel 4 is not a positive odd number"):
        UNet(**DIGITS_UNET, conv_in_kernel=4)


def test_unet_final_res_block_sees_the_decoder_and_the_first_convolution():
    net, seen = UNet(**DIGITS_UNET, final_res_block=True, zero_init=False), {}
    net.conv_in.register_forward_hook(lambda m, i, out: seen.update(first=out))
    net.final[0].register_forward_pre_hook(lambda m, args: seen.update(final=args[0]))
    net.up[-1][-1].register_forward_hook(lambda m, i, out: seen.update(decoder=out))  # the decoder's last layer
    net(torch.randn(2, 1, 8, 8), torch.tensor([3, 7]))
    assert seen["final"].shape == (2, 32 + 32, 8, 8)
    torch.testing.assert_close(seen["final"], torch.cat([seen["decoder"], seen["first"]], dim=1), rtol=0, atol=0)
    # exactly one ResBlock of 64 -> 32 channels more than without it
    block = sum(p.numel() for p in net.final.parameters())
    plain = UNet(**DIGITS_UNET)
    assert sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in plain.parameters()) == block
    assert net.final[0].conv1.in_channels == 64 and net.final[0].conv2.out_channels == 32


@pytest.mark.parametrize("final_res_block", [False, True])
def test_unet_zero_init_zeroes_every_residual_branch_and_the_output(final_res_block):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    zero = UNet(**DIGITS_UNET, final_res_block=final_res_block)
    last_layers = [m.conv2 for m in zero.modules() if m.__class__.__name__ == "ResBlock"]
    last_layers += [m.proj for m in zero.modules() if m.__class__.__name__ == "AttentionBlock"] + [zero.out[-1]]
    assert all(p.abs().max() == 0 for layer in last_layers for p in layer.parameters())
    assert zero(x, t).abs().max() == 0
    torch.manual_seed(0)
    kept = UNet(**DIGITS_UNET, final_res_block=final_res_block, zero_init=False)
    last_layers = [m.conv2 for m in kept.modules() if m.__class__.__name__ == "ResBlock"]
    last_layers += [m.proj for m in kept.modules() if m.__class__.__name__ == "AttentionBlock"] + [kept.out[-1]]
    assert all(layer.weight.abs().min() > 0 for layer in last_layers)
    assert kept(x, t).abs().mean() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = UNet(ch=32, ch_mult=(1, 2), image_size=8, attn_resolutions=(4,), dropout=0.0)
    b = UNet(ch=32, ch_mult=(1, 2), image_size=8, attn_resolutions=(4,), dropout=0.0, gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01)
        b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    a(x, t).square().mean().backward()
    b(x, t).square().mean().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_unet_channels_last_and_bf16_autocast():
    net = _perturbed(_build_tiny("unet")).eval().to(memory_format=torch.channels_last)  # eval: no dropout
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    ref = net(x, torch.tensor([10, 20]))
    assert ref.abs().max() > 1e-2  # not the zero output of a fresh U-Net
    torch.testing.assert_close(ref, net(x.contiguous(), torch.tensor([10, 20])), rtol=1e-5, atol=1e-5)  # layout-free
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.tensor([10, 20]))
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05)


@pytest.mark.slow
def test_unet_compiles_without_graph_breaks():
    net = _perturbed(_build_tiny("unet")).eval()  # eval: no dropout, so compiled and eager outputs compare
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    assert net(x, t).abs().max() > 1e-2  # not the zero output of a fresh U-Net
    explanation = torch._dynamo.explain(net)(x, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(net)
    torch.testing.assert_close(compiled(x, t), net(x, t), rtol=1e-4, atol=1e-4)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet'; choose one of: .*mlp.*unet"):
        build_backbone("resnet")
    with pytest.raises(ValueError, match=r"already registered .*registered: .*mlp"):
        register_backbone("mlp")(UNet)
    with pytest.raises(ValueError, match=r"unexpected arguments \['widht'\]"):
        build_backbone("mlp", widht=3)
    with pytest.raises(ValueError, match="cannot be imported"):
        build_backbone({"class_path": "no_such_pkg.Net"})
    with pytest.raises(ValueError, match="needs 'name'"):
        build_backbone({"model": "mlp"})


def test_yaml_short_name_and_class_path():
    by_name = yaml.safe_load("backbone:\n  name: mlp\n  init_args: {hidden_dim: 16, num_blocks: 1}\n")
    net = build_backbone(by_name["backbone"], defaults={"in_channels": 3})
    assert isinstance(net, MLP) and net.in_channels == 3 and net.inp.out_features == 16
    by_path = yaml.safe_load("backbone:\n  name: torch.nn.Linear\n  init_args: {in_features: 2, out_features: 2}\n")
    assert isinstance(build_backbone(by_path["backbone"], defaults={"in_channels": 2}), nn.Linear)
    assert isinstance(build_backbone(yaml.safe_load("backbone: mlp")["backbone"]), MLP)
    # class_path is a synonym of name for Python callers
    assert isinstance(build_backbone({"class_path": "mlp", "init_args": {"hidden_dim": 4}}), MLP)


def test_entry_point_plugin_is_loaded_lazily_once(monkeypatch):
    loads = []

    class PluginNet(MLP):
        pass

    class FakeEntryPoint:
        name = "plugin_net"

        def load(self):
            loads.append(1)
            return PluginNet

    def fake_entry_points(group=None):
        assert group == registry.ENTRY_POINT_GROUP
        return [FakeEntryPoint()]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_plugins_scanned", False)
    monkeypatch.setattr(registry, "_PLUGINS", {})
    monkeypatch.setattr(registry, "BACKBONES", registry.BACKBONES.copy())
    assert "plugin_net" in available_backbones() and loads == []  # listed without importing
    spec = yaml.safe_load("backbone:\n  name: plugin_net\n  init_args: {hidden_dim: 8}\n")["backbone"]
    assert isinstance(build_backbone(spec), PluginNet)
    build_backbone("plugin_net")
    assert loads == [1]


def test_readme_custom_backbone_example_runs(monkeypatch):
    source = (ROOT / "examples" / "custom_backbone.py").read_text()
    body = source.split('"""', 2)[2].strip()
    assert body in documentation(), "the docs must show examples/custom_backbone.py verbatim"
    monkeypatch.setattr(registry, "BACKBONES", registry.BACKBONES.copy())
    monkeypatch.syspath_prepend(str(ROOT))
    runpy.run_path(str(ROOT / "examples" / "custom_backbone.py"), run_name="examples.custom_backbone")


@pytest.mark.parametrize(
    "how", [["examples/custom_backbone.py"], ["-m", "examples.custom_backbone"]], ids=["script", "module"]
)
def test_custom_backbone_example_runs_as_a_script_and_as_a_module(how):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-W", "error", *how], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "built TinyConv output (2, 3, 8, 8)" in result.stdout


def test_registering_the_same_class_again_replaces_it(monkeypatch):
    monkeypatch.setattr(registry, "BACKBONES", registry.BACKBONES.copy())
    namespace: dict = {"__name__": "__main__"}
    source = (
        "from torch import nn\nclass Again(nn.Module):\n    def forward(self, x, t, cond=None):\n        return x\n"
    )
    exec(compile(source, "<cell>", "exec"), namespace)  # a notebook cell ...
    register_backbone("again")(namespace["Again"])
    exec(compile(source, "<cell>", "exec"), namespace)  # ... run twice defines a new class object
    register_backbone("again")(namespace["Again"])
    assert build_backbone("again").__class__ is namespace["Again"]
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("again")(MLP)  # another class under a taken name still fails


def test_mlp_fourier_features_option():
    from lightning_ddpm.backbones.mlp import FourierFeatures

    f = FourierFeatures(2, 8, scale=3.0)
    x = torch.randn(5, 2, dtype=torch.float64)
    proj = 2 * torch.pi * x @ f.B.double()
    torch.testing.assert_close(f(x), torch.cat([x, proj.sin(), proj.cos()], dim=1))
    # B ~ N(0, 3^2): standard normal draws of its own seeded generator (seed 0 unless given), times the scale
    torch.testing.assert_close(f.B, 3.0 * torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), rtol=0, atol=0)
    torch.testing.assert_close(
        FourierFeatures(2, 8, scale=0.5, seed=7).B,
        0.5 * torch.randn(2, 8, generator=torch.Generator().manual_seed(7)),
        rtol=0,
        atol=0,
    )
    a, b = MLP(fourier_features=8, fourier_scale=3.0), MLP(fourier_features=8, fourier_scale=3.0)
    torch.testing.assert_close(a.features.B, b.features.B)  # fixed by its seed: the same in every process
    out = a(torch.randn(4, 2), torch.tensor([0, 1, 2, 999]))
    assert out.shape == (4, 2) and "features.B" in a.state_dict()
    assert MLP().features is None  # off by default: x enters the MLP as it is


def test_mlp_fourier_x_scale_option():
    """fourier_x_scale multiplies the raw x beside the features; 1 by default (as before the option),
    and it adds no parameters or buffers, so checkpoints load across it in both directions."""
    from lightning_ddpm.backbones.mlp import FourierFeatures

    x = torch.randn(5, 2, dtype=torch.float64)
    plain, scaled = FourierFeatures(2, 8, scale=3.0), FourierFeatures(2, 8, scale=3.0, x_scale=32.0)
    assert plain.x_scale == 1.0
    torch.testing.assert_close(scaled(x)[:, :2], 32.0 * x)
    torch.testing.assert_close(scaled(x)[:, 2:], plain(x)[:, 2:])  # the sinusoids are unchanged
    assert MLP(fourier_features=8).features.x_scale == 1.0  # default: today's behaviour
    old = MLP(fourier_features=8, fourier_scale=2.0)
    new = MLP(fourier_features=8, fourier_scale=2.0, fourier_x_scale=32.0)
    assert new.state_dict().keys() == old.state_dict().keys()
    new.load_state_dict(old.state_dict())  # an old checkpoint loads into the new option and back
    old.load_state_dict(new.state_dict())
    xt = torch.randn(4, 2)
    torch.testing.assert_close(new.features(xt), torch.cat([32.0 * xt, old.features(xt)[:, 2:]], 1))
    assert new(xt, torch.tensor([0, 1, 2, 999])).shape == (4, 2)


def test_fsdp_units_are_the_blocks_and_hold_most_parameters():
    """ModelParallelStrategy shards each ResBlock / attention block (U-Net) and residual block (MLP)
    as a unit of its own, the backbone taking the rest; tests/integration/test_sharded.py runs it on 2 processes."""
    from lightning_ddpm.backbones.sharding import shard_units
    from lightning_ddpm.backbones.unet import AttentionBlock, ResBlock

    unet = UNet(in_channels=3, image_size=32, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
    units = shard_units(unet)
    blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    assert units == blocks and len(blocks) == 8 + 2 + 12 + 3 + 3  # res down, attn down, res up, attn up, mid
    in_units = sum(p.numel() for u in units for p in u.parameters())
    assert in_units / sum(p.numel() for p in unet.parameters()) > 0.9  # gathered one block at a time
    mlp = MLP(hidden_dim=16, num_blocks=3)
    assert len(shard_units(mlp)) == 3
    toy = MLP(hidden_dim=256, num_blocks=4, fourier_features=64, fourier_scale=2.0)  # configs/toy2d.yaml's
    in_units = sum(p.numel() for u in shard_units(toy) for p in u.parameters())
    assert in_units / sum(p.numel() for p in toy.parameters()) > 0.9
    assert shard_units(nn.Linear(2, 2)) == []  # a backbone without shard_units is one unit
