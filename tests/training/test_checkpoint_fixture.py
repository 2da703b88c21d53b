"""Checkpoints written before the package was restructured (tests/fixtures/make_pre_refactor.py) still load,
sample the same and resume: moving code must not change what a checkpoint means."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_ddpm import DiffusionModule
from lightning_ddpm.callbacks import EMA
from tests.fixtures.make_pre_refactor import MODELS, samples

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_checkpoint_from_before_the_restructuring_samples_the_same(name):
    module = DiffusionModule.load_from_checkpoint(FIXTURES / f"{name}.ckpt", map_location="cpu").eval()
    expected = torch.load(FIXTURES / f"{name}_samples.pt", weights_only=True)
    for sampler, drawn in samples(module).items():
        # the same weights and the same arithmetic; 1e-5 allows another CPU's kernels (bit-identical here)
        torch.testing.assert_close(drawn, expected[sampler], rtol=0, atol=1e-5, msg=f"{name}, {sampler}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_checkpoint_from_before_the_restructuring_resumes(name, tmp_path):
    settings, data = MODELS[name]
    checkpoint = torch.load(FIXTURES / f"{name}.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and any("EMA" in key for key in checkpoint["callbacks"])
    module = DiffusionModule(**settings, data_shape=data().data_shape, num_classes=data().num_classes)
    trainer = Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[EMA(decay=0.5)],
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data(), ckpt_path=FIXTURES / f"{name}.ckpt")
    assert trainer.global_step == 4
