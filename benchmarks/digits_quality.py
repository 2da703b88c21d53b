"""Quality on real images without a download: scikit-learn's 8x8 digits, a few model configurations.

For each configuration, train the digits U-Net (the earlier configs/digits.yaml's network, unless the
configuration changes it) for ``--steps`` steps
with EMA, then report with the EMA weights:

- bits/dim on the held-out split (the full variational bound over all T steps plus the prior, in
  8-bit bins; the digits have only 17 grey levels, so this is a bound for the 8-bit data, not a
  compression rate for the 17-level source);
- pixel-space MMD (RBF kernel, median-heuristic bandwidth) between samples and the held-out images,
  next to the train-vs-held-out floor (a sample-quality figure that needs no feature network);
- the digits Frechet distance, KID and confident share (``benchmarks.metrics.DigitsScores``: the shipped
  classifier's features) of ``--score-samples`` DDIM-50 samples against the training digits, as mean and
  standard deviation over ``--score-seeds`` sampling seeds;
- a grid of 100 samples (DDIM 50 steps and DDPM with all T steps) per configuration.

    python -m benchmarks.digits_quality --steps 1500
    python -m benchmarks.digits_quality --configs ho_linear v_cosine --steps 3000
    python -m benchmarks.digits_quality --configs eps_cosine v_cosine v_sigmoid eps_sigmoid --no-ddpm  # ablation
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from benchmarks.common import device_name, print_table, write_json
from benchmarks.metrics import DigitsScores, mean_sd, median_bandwidth, mmd_rbf
from benchmarks.peer import PEER_UNET, PeerModule, peer_available, register_peer_unet
from lightning_ddpm import DDIMSampler, DDPMSampler, DiffusionModule
from lightning_ddpm.callbacks import EMA, ema_weights
from lightning_ddpm.data import ImageDataModule
from lightning_ddpm.samplers import INTEGER_SPACINGS
from lightning_ddpm.training.plotting import save_image_grid

BACKBONE = {
    "name": "unet",
    "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2, "attn_resolutions": [4], "dropout": 0.1},
}


def unet(**init_args: Any) -> dict[str, Any]:
    """The ablation's baseline U-Net (the earlier digits one: 32 groups, dropout 0.1), ``init_args`` changed."""
    return {**BACKBONE, "init_args": {**BACKBONE["init_args"], **init_args}}


def recipe(description: str, parameterization: str, schedule: str, **settings: Any) -> tuple[str, dict[str, Any]]:
    """``(description, DiffusionModule settings)``: fixed_small and L_simple unless ``settings`` say otherwise."""
    return description, {
        "schedule": schedule,
        "parameterization": parameterization,
        "variance": "fixed_small",
        "loss": "simple",
        **settings,
    }


# name -> (what it is, DiffusionModule settings)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "ho_linear": recipe("Ho et al.: eps, linear, fixed_large, L_simple", "eps", "linear", variance="fixed_large"),
    "eps_cosine": recipe("eps, cosine, fixed_small, L_simple (the earlier configs/digits.yaml)", "eps", "cosine"),
    "iddpm_hybrid": recipe(
        "Nichol & Dhariwal: eps, cosine, learned_range, L_hybrid",
        "eps",
        "cosine",
        variance="learned_range",
        loss="hybrid",
    ),
    "v_cosine": recipe("v, cosine, fixed_small, L_simple", "v", "cosine"),
    # one change at a time from the earlier configs/digits.yaml (eps_cosine), for the recipe ablation
    "v_sigmoid": recipe("v, sigmoid, fixed_small, L_simple", "v", "sigmoid"),
    "eps_sigmoid": recipe("eps, sigmoid, fixed_small, L_simple", "eps", "sigmoid"),
    "eps_cosine_no_dropout": recipe(
        "the earlier configs/digits.yaml without dropout", "eps", "cosine", backbone=unet(dropout=0.0)
    ),
    "eps_cosine_lr3e-4": recipe(
        "the earlier configs/digits.yaml with lr 3e-4",
        "eps",
        "cosine",
        optimizer={"name": "torch.optim.Adam", "init_args": {"lr": 3e-4}},
    ),
    "v_sigmoid_no_dropout": recipe("v, sigmoid, no dropout", "v", "sigmoid", backbone=unet(dropout=0.0)),
    # the peer's two differences from v_sigmoid besides the trainer: its loss weight and its U-Net
    "v_sigmoid_eps_mse": recipe(
        "v, sigmoid, the v error weighted by alpha_bar (the eps-space error, the peer's loss)",
        "v",
        "sigmoid",
        # min(snr, gamma) * |dx0/dv|^2 = snr * (1 - alpha_bar) = alpha_bar; gamma never clamps
        loss_weighting="min_snr",
        min_snr_gamma=1e12,
    ),
    # which of the peer U-Net's choices this U-Net lacks, one at a time on v_sigmoid_no_dropout: 32 GroupNorm
    # groups of 32 channels normalise each channel over its 8x8 map alone (the peer: RMSNorm across channels)
    "v_sigmoid_g8": recipe(
        "v, sigmoid, no dropout, 8 GroupNorm groups", "v", "sigmoid", backbone=unet(dropout=0.0, norm_groups=8)
    ),
    "v_sigmoid_g8_film": recipe(
        "v, sigmoid, no dropout, 8 groups, scale-shift time conditioning",
        "v",
        "sigmoid",
        backbone=unet(dropout=0.0, norm_groups=8, scale_shift_norm=True),
    ),
    "v_sigmoid_g8_film_attn8": recipe(
        "v, sigmoid, no dropout, 8 groups, scale-shift, attention at 8x8 and 4x4 (4 heads)",
        "v",
        "sigmoid",
        backbone=unet(dropout=0.0, norm_groups=8, scale_shift_norm=True, attn_resolutions=[8, 4], num_heads=4),
    ),
    # three more of the peer U-Net's choices, one at a time on v_sigmoid_g8_film, and together; without zero
    # initialisation it is configs/digits.yaml
    "v_sigmoid_g8_film_k7": recipe(
        "v_sigmoid_g8_film, a 7x7 first convolution",
        "v",
        "sigmoid",
        backbone=unet(dropout=0.0, norm_groups=8, scale_shift_norm=True, conv_in_kernel=7),
    ),
    "v_sigmoid_g8_film_final": recipe(
        "v_sigmoid_g8_film, a final ResBlock on the decoder and first-convolution features",
        "v",
        "sigmoid",
        backbone=unet(dropout=0.0, norm_groups=8, scale_shift_norm=True, final_res_block=True),
    ),
    "v_sigmoid_g8_film_no_zero": recipe(
        "v_sigmoid_g8_film without zero initialisation (configs/digits.yaml)",
        "v",
        "sigmoid",
        backbone=unet(dropout=0.0, norm_groups=8, scale_shift_norm=True, zero_init=False),
    ),
    "v_sigmoid_g8_film_peer3": recipe(
        "v_sigmoid_g8_film, 7x7 first convolution, final ResBlock, no zero initialisation",
        "v",
        "sigmoid",
        backbone=unet(
            dropout=0.0, norm_groups=8, scale_shift_norm=True, conv_in_kernel=7, final_res_block=True, zero_init=False
        ),
    ),
    "v_sigmoid_peer_unet": recipe(
        "v, sigmoid, the peer's U-Net (0.83 M parameters, no dropout)", "v", "sigmoid", backbone=PEER_UNET
    ),
}
# the row that configs/digits.yaml is (tests/docs/test_readme_claims.py checks the two agree)
DIGITS_YAML_ROW = "v_sigmoid_g8_film_no_zero"
# needs denoising-diffusion-pytorch: its own GaussianDiffusion in the same loop (benchmarks/peer.py)
PEER = "peer"
PEER_DESCRIPTION = "denoising-diffusion-pytorch's default recipe (its U-Net, v, sigmoid, its loss)"
COMMON: dict[str, Any] = {
    "backbone": BACKBONE,
    "data_shape": [1, 8, 8],
    "clip_denoised": True,
    "optimizer": {"name": "torch.optim.Adam", "init_args": {"lr": 1e-3}},
    "lr_warmup_steps": 200,
}


COLUMNS = [
    "config",
    "bpd_held_out",
    "mmd_ddim50",
    "mmd_ddpm",
    "frechet_mean",
    "frechet_sd",
    "kid_mean",
    "confident_mean",
    "train_s",
]


def digits_scores(sample: Callable[[int, int], Tensor], scores: DigitsScores, n: int, seeds: int) -> dict[str, float]:
    """Digits Frechet distance / KID / confident share of ``sample(n, seed)`` against the training digits, as mean
    and standard deviation over ``seeds`` sampling seeds."""
    return mean_sd([scores(sample(n, seed)) for seed in range(seeds)])


def ddim50(module: DiffusionModule, spacing: str = "leading") -> Callable[[int, int], Tensor]:
    """``(n, seed) -> n`` DDIM-50 samples of ``module`` on the ``spacing`` grid; sample i of seed s from
    100000 * (s + 1) + i."""

    def sample(n: int, seed: int) -> Tensor:
        generators = [torch.Generator().manual_seed(100_000 * (seed + 1) + i) for i in range(n)]
        return module.sample(n, sampler=DDIMSampler(num_steps=50, spacing=spacing), generator=generators)

    return sample


def peer_ddim50(module: PeerModule) -> Callable[[int, int], Tensor]:
    """``(n, seed) -> n`` samples of the peer's own DDIM-50 sampler (global generator seeded 100000 * (s + 1))."""
    return lambda n, seed: module.sample(n, seed=100_000 * (seed + 1))


def peer_network(peer: PeerModule) -> DiffusionModule:
    """A ``DiffusionModule`` (v, sigmoid, the peer's U-Net) holding the network the peer trained (its current
    weights: call under ``ema_weights`` for the EMA), for this library's samplers and bound."""
    settings = {**COMMON, **CONFIGS["v_sigmoid_peer_unet"][1]}
    module = DiffusionModule(**settings)
    module.backbone.unet.load_state_dict(peer.diffusion.model.state_dict())
    return module.eval()


def images(loader: torch.utils.data.DataLoader) -> Tensor:
    """All images of a loader of (images, labels) batches, in [-1, 1]."""
    return torch.cat([batch[0] for batch in loader])


def save_overview(grids: dict[str, Path], path: str | Path, title: str) -> Path:
    """The per-configuration sample grids side by side, titled, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_ddpm.training.plotting import load_png

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        ax.imshow(load_png(grid).permute(1, 2, 0).numpy())
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train(module: pl.LightningModule, steps: int) -> tuple[pl.Trainer, float]:
    """Fit ``module`` on the digits for ``steps`` steps of batch 64 with EMA 0.999 and gradient clipping 1."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[EMA(decay=0.999)],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=ImageDataModule("digits", batch_size=64, val_fraction=0.1))
    return trainer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, PEER])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of batch 64 per configuration")
    parser.add_argument("--num-samples", type=int, default=300, help="samples for the MMD")
    parser.add_argument(
        "--ddpm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also sample with DDPM over all T steps (slow: T model calls)",
    )
    parser.add_argument("--score-samples", type=int, default=1000, help="DDIM-50 samples for the digits scores")
    parser.add_argument("--score-seeds", type=int, default=3, help="sampling seeds of the digits scores (0: none)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed: initialisation and noise (the split and batch order stay fixed)",
    )
    parser.add_argument(
        "--spacing",
        default="leading",
        choices=INTEGER_SPACINGS,
        help="timestep grid of this library's DDIM-50 (leading starts at t = T - T/50; trailing at t = T - 1)",
    )
    parser.add_argument("--out", default="benchmarks/results/digits_quality.json")
    parser.add_argument("--plots", default="benchmarks/results/digits_quality")
    args = parser.parse_args()
    if PEER in args.configs or any(CONFIGS[c][1].get("backbone") == PEER_UNET for c in args.configs if c in CONFIGS):
        if not peer_available():
            parser.error("the peer rows need denoising-diffusion-pytorch: pip install denoising-diffusion-pytorch")
        register_peer_unet()

    data = ImageDataModule("digits", batch_size=64, val_fraction=0.1)
    data.setup("fit")
    train_images, held_out = images(data.train_dataloader()), images(data.val_dataloader())
    bandwidth = median_bandwidth(held_out)
    floor = mmd_rbf(
        train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[: len(held_out)]],
        held_out,
        bandwidth,
    )
    scores = DigitsScores(train_images)
    grids: dict[str, Path] = {}
    rows: list[dict[str, Any]] = [{"config": "train vs held-out (floor)", "mmd_ddim50": floor, "mmd_ddpm": floor}]
    print(f"{len(train_images)} training and {len(held_out)} held-out digits; RBF bandwidth {bandwidth:.2f}")
    for name in args.configs:
        pl.seed_everything(args.seed, verbose=False)
        if name == PEER:
            peer = PeerModule()
            trainer, train_s = train(peer, args.steps)
            peer.eval()
            with ema_weights(trainer, peer), torch.no_grad():
                own = {"config": PEER, "description": f"{PEER_DESCRIPTION}, its DDIM-50", "seed": args.seed}
                own["train_s"] = train_s
                if args.score_seeds:
                    own.update(digits_scores(peer_ddim50(peer), scores, args.score_samples, args.score_seeds))
                module = peer_network(peer)
            rows.append(own)
            print_table(rows[-1:], COLUMNS)
            name, description, trainer = "peer_ours", "the peer's network, this library's DDIM-50 and bound", None
        else:
            description, settings = CONFIGS[name]
            module = DiffusionModule(**{**COMMON, **settings})
            trainer, train_s = train(module, args.steps)
            module.eval()
        row: dict[str, Any] = {"config": name, "description": description, "seed": args.seed, "spacing": args.spacing}
        row["train_s"] = train_s
        with ema_weights(trainer, module), torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            row["bpd_held_out"] = module.diffusion.mean_bits_per_dim(module.denoiser(), [held_out], generator=generator)
            row["bpd_s"] = time.perf_counter() - start
            samplers = [("ddim50", DDIMSampler(num_steps=50, spacing=args.spacing))]
            samplers += [("ddpm", DDPMSampler())] if args.ddpm else []
            for label, sampler in samplers:
                samples = module.sample(args.num_samples, sampler=sampler, generator=torch.Generator().manual_seed(1))
                row[f"mmd_{label}"] = mmd_rbf(samples, held_out, bandwidth)
                grids[name] = save_image_grid(samples[:100], Path(args.plots) / f"{name}_{label}.png", nrow=10)
            if args.score_seeds:
                row.update(digits_scores(ddim50(module, args.spacing), scores, args.score_samples, args.score_seeds))
        rows.append(row)
        print_table(rows[-1:], COLUMNS)
    device = device_name(torch.device("cpu"))
    print(f"\ndevice: {device}; {args.steps} training steps of batch 64 per configuration, EMA 0.999 weights")
    print_table(rows, [*COLUMNS, "bpd_s"])
    settings = {"device": device, "steps": args.steps, "seed": args.seed, "spacing": args.spacing}
    write_json(args.out, {**settings, "bandwidth": bandwidth, "rows": rows})
    sampler = "DDPM, all T steps" if args.ddpm else "DDIM 50 steps"
    print(f"wrote {save_overview(grids, Path(args.plots) / 'overview.png', f'{sampler}, {args.steps} training steps')}")


if __name__ == "__main__":
    main()
