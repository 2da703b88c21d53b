"""A custom backbone, registered by name and built the three ways a config can name it."""

import torch
from torch import nn

from lightning_ddpm import build_backbone, register_backbone
from lightning_ddpm.backbones.embeddings import timestep_embedding


@register_backbone("tiny_conv")
class TinyConv(nn.Module):
    """Any nn.Module with forward(x, t, cond=None) -> output shaped like x; t may be fractional
    (Karras sigmas), so it is embedded with sinusoidal features, not a lookup table."""

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, width: int = 32):
        super().__init__()
        self.width = width
        self.time = nn.Linear(width, width)
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, out_channels or in_channels, 3, padding=1)

    def forward(self, x, t, cond=None):
        h = torch.relu(self.inp(x) + self.time(timestep_embedding(t, self.width))[:, :, None, None])
        return self.out(h)


# 1. by the registered short name (what `backbone: tiny_conv` in a YAML config does)
net = build_backbone("tiny_conv", width=16)
# 2. by the dotted class path of any importable nn.Module, registered or not, with init_args
#    (a config writes e.g. "my_nets.TinyConv"; this file's own module is __main__ when it runs)
net = build_backbone({"name": f"{__name__}.TinyConv", "init_args": {"width": 16}})
# 3. an installed package exposes it in its pyproject.toml, then configs use the short name:
#    [project.entry-points."lightning_ddpm.backbones"]
#    tiny_conv = "my_package.nets:TinyConv"
out = net(torch.randn(2, 3, 8, 8), torch.tensor([3, 700]))
assert out.shape == (2, 3, 8, 8) and net(torch.randn(2, 3, 8, 8), torch.tensor([2.5, 699.75])).isfinite().all()
print("built", type(net).__name__, "output", tuple(out.shape))
