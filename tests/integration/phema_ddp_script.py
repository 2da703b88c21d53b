"""A run for the PostHocEMA multi-process test: ``python -m tests.integration.phema_ddp_script DEVICES OUT``.

A linear regression whose loss is a mean over the batch, on fixed data in a fixed order: 2 processes of batch
8 (rank r takes the items r, r + 2, ...) see, step for step, exactly the items 1 process of
batch 16 sees, and DDP averages their gradients, so the weights and the snapshots must agree.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_ddpm.callbacks import PostHocEMA

GLOBAL_BATCH = 16


class Regression(pl.LightningModule):
    def __init__(self, data: TensorDataset) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 3)
        self.data = data

    def train_dataloader(self) -> DataLoader:
        # rank r takes items r, r + world, ... in order (Lightning's own DDP sampler would shuffle)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.data, batch_size=GLOBAL_BATCH // world, sampler=sampler)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(devices: int, out: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * GLOBAL_BATCH, 4, generator=g)
    y = x @ torch.randn(4, 3, generator=g) + 0.1 * torch.randn(16 * GLOBAL_BATCH, 3, generator=g)
    torch.manual_seed(1)
    module = Regression(TensorDataset(x, y))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=24,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[PostHocEMA((0.05, 0.10), snapshot_every_n_steps=8, snapshot_dir=out, snapshot_dtype="float32")],
    )
    trainer.fit(module)
    torch.save(module.net.state_dict(), f"{out}/weights_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
