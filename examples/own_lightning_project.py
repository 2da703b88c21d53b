"""DiffusionModule inside an existing Lightning project, next to the user's own DataModule."""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ddpm import DDIMSampler, DiffusionModule


class UnitCircle(pl.LightningDataModule):
    """The user's own data: points on the unit circle, as (x,) batches."""

    @staticmethod
    def points(n: int, seed: int) -> TensorDataset:
        angle = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 2 * torch.pi
        return TensorDataset(torch.stack([angle.cos(), angle.sin()], dim=1))

    def train_dataloader(self):
        return DataLoader(self.points(8192, seed=0), batch_size=256, shuffle=True)

    def val_dataloader(self):  # DiffusionModule logs val/loss (and the timestep-quartile losses)
        return DataLoader(self.points(1024, seed=1), batch_size=256)


model = DiffusionModule(
    backbone={"name": "mlp", "init_args": {"hidden_dim": 128, "num_blocks": 3}},
    data_shape=[2],
    schedule="cosine",
    parameterization="v",  # unclipped 2-D data: v avoids eps's error amplification at high noise
    num_timesteps=200,
    optimizer={"name": "torch.optim.Adam", "init_args": {"lr": 2e-3}},
    lr_warmup_steps=50,
)
pl.seed_everything(0)
trainer = pl.Trainer(
    max_steps=800, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
)
trainer.fit(model, datamodule=UnitCircle())

samples = model.sample(1000, sampler=DDIMSampler(num_steps=50), generator=torch.Generator().manual_seed(1))
radius = samples.norm(dim=1)
near = (radius - 1).abs() < 0.1
print(f"{near.float().mean():.1%} of samples lie within 0.1 of the unit circle; median radius {radius.median():.3f}")
