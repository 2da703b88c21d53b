"""Edit requests (``EditRequestsDataModule``): named masks, folders of images and masks, per-request seeds, and
``lightning-ddpm predict`` writing completions with a before/after grid."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ddpm.cli import run_cli
from lightning_ddpm.data import MASKS, EditRequestsDataModule, named_mask
from lightning_ddpm.training.plotting import load_png

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests/fixtures/unet_digits_cond.ckpt"  # a class-conditional digits U-Net, T = 50
REPAINT = '{"name": "repaint", "init_args": {"num_steps": 10, "jump_length": 3, "jump_n_sample": 2}}'


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (32, 32), (1, 5)])
def test_every_named_mask(size):
    h, w = size
    for name in MASKS:
        mask = named_mask(name, h, w, seed=3)
        assert mask.shape == (1, h, w) and set(mask.unique().tolist()) <= {0.0, 1.0}, name
        holes = mask[0] == 0
        if name == "center":
            assert holes.sum() == (h - 2 * (h // 4)) * (w - 2 * (w // 4))
            assert not holes[0].any() or h < 4
        elif name.endswith("_half"):
            side = {"left_half": holes[:, : w // 2], "right_half": holes[:, w // 2 :]}.get(name)
            side = side if side is not None else {"top_half": holes[: h // 2], "bottom_half": holes[h // 2 :]}[name]
            assert side.all() and holes.sum() == side.numel(), name
        else:  # random_boxes: some holes, placed by the seed
            assert holes.any() and torch.equal(mask, named_mask(name, h, w, seed=3))
    if h * w > 16:
        assert not torch.equal(named_mask("random_boxes", h, w, seed=3), named_mask("random_boxes", h, w, seed=4))


def _folder(root: Path, names, size=(8, 8), value=None) -> Path:
    root.mkdir(parents=True)
    g = np.random.default_rng(0)
    for name in names:
        pixels = g.integers(0, 256, size, dtype=np.uint8) if value is None else np.full(size, value, np.uint8)
        Image.fromarray(pixels, mode="L").save(root / f"{name}.png")
    return root


def test_a_folder_of_images_with_a_folder_of_masks(tmp_path):
    images = _folder(tmp_path / "images", ["b", "a", "c"])
    masks = _folder(tmp_path / "masks", ["c", "a", "b"], value=255)
    Image.fromarray(np.tile(np.array([[255] * 4 + [0] * 4], np.uint8), (8, 1)), mode="L").save(masks / "b.png")
    data = EditRequestsDataModule(str(images), masks=str(masks), channels=1, repeats=2, seed=5)
    requests = data.requests()
    assert len(requests) == 6
    item = requests[2]  # image "b" (file-name order a, b, c), first repeat
    assert item["seed"] == 7 and item["images"].shape == (1, 8, 8)
    assert torch.equal(item["mask"][0, 0], torch.tensor([1.0] * 4 + [0.0] * 4))  # white keeps, black generates
    assert item["images"].min() >= -1 and item["images"].max() <= 1
    (masks / "c.png").unlink()
    with pytest.raises(ValueError, match=r"masks: no mask under .* for 1 images, e.g. 'c'"):
        EditRequestsDataModule(str(images), masks=str(masks), channels=1).requests()


def test_the_refusals():
    with pytest.raises(ValueError, match="exactly one of mask .*, masks .* or strength .*, got none"):
        EditRequestsDataModule("digits")
    with pytest.raises(ValueError, match="exactly one of .* got mask, strength"):
        EditRequestsDataModule("digits", mask="center", strength=0.5)
    with pytest.raises(ValueError, match="unknown mask 'middle'; choose one of: center, left_half"):
        EditRequestsDataModule("digits", mask="middle")
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
        EditRequestsDataModule("digits", strength=0.0)


def _predict(out: Path, *extra: str):
    return run_cli(
        [
            "predict",
            "--ckpt_path",
            str(FIXTURE),
            f"--trainer.default_root_dir={out}",
            "--trainer.enable_progress_bar=false",
            "--predict_writer.output_dir",
            str(out),
            "--data",
            "lightning_ddpm.data.EditRequestsDataModule",
            "--data.images=digits",
            *extra,
        ]
    )


def test_predict_completes_held_out_digits_and_draws_a_before_after_grid(tmp_path):
    """The bottom half of 20 held-out digits (the first 10, twice each) completed by repaint from the command line:
    the kept half is the original's bit for bit, each completion depends on its seed alone (batch 4 = batch 20),
    and edits.png holds the originals, what the model was given and the results, 16 wide."""
    args = ["--data.mask=bottom_half", "--data.repeats=2", "--data.num_images=10", f"--data.sampler={REPAINT}"]
    _predict(tmp_path / "a", *args, "--data.batch_size=4")
    cli = _predict(tmp_path / "b", *args, "--data.batch_size=20")
    requests = cli.datamodule.requests()
    a = torch.load(tmp_path / "a/samples.pt", weights_only=True)["samples"]
    b = torch.load(tmp_path / "b/samples.pt", weights_only=True)["samples"]
    originals = requests.images[:10].repeat_interleave(2, 0)
    assert len(requests) == 20 and a.shape == (20, 1, 8, 8)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.equal(a[..., :4, :], originals[..., :4, :])
    assert not torch.allclose(a[..., 4:, :], originals[..., 4:, :])  # the bottom half was generated
    assert not torch.allclose(a[0::2], a[1::2])  # two seeds, two completions
    grid = load_png(tmp_path / "a/edits.png")
    cell = (grid.shape[-1] - 4) // 16  # 8x8 digits enlarged to 32 pixels, 4 pixels of padding
    assert cell == 36 and grid.shape[-2] == 3 * 2 * cell + 4  # two blocks of three rows: 16 requests, then 4


def test_predict_edits_with_a_strength(tmp_path):
    _predict(
        tmp_path,
        "--data.strength=0.3",
        "--data.num_images=4",
        '--data.sampler={"name": "ddim", "init_args": {"num_steps": 10}}',
    )
    out = torch.load(tmp_path / "samples.pt", weights_only=True)["samples"]
    assert out.shape[1:] == (1, 8, 8) and torch.isfinite(out).all() and (tmp_path / "edits.png").exists()


@pytest.mark.parametrize("kind", [{"mask": "center"}, {"strength": 0.4}])
def test_edit_requests_keep_the_data_contract(kind):
    """A DiffusionDataModule; requests ``seed + i`` in order, images in [-1, 1] of the data shape, a mask of the
    same shape or the strength, the sampler as JSON."""
    from lightning_ddpm.data import DiffusionDataModule

    data = EditRequestsDataModule(
        "digits", num_images=5, repeats=2, seed=11, batch_size=3, data_shape=[1, 8, 8], **kind
    )
    assert isinstance(data, DiffusionDataModule) and data.data_shape == [1, 8, 8]
    batches = list(data.predict_dataloader())
    index, seed = torch.cat([b["index"] for b in batches]), torch.cat([b["seed"] for b in batches])
    assert index.tolist() == list(range(10)) and torch.equal(seed, index + 11)
    for batch in batches:
        assert batch["images"].shape[1:] == (1, 8, 8) and batch["images"].abs().max() <= 1
        assert batch["sampler"] == [""] * len(batch["index"])
        if "mask" in kind:
            assert batch["mask"].shape == batch["images"].shape and "strength" not in batch
        else:
            assert torch.equal(batch["strength"], torch.full((len(batch["index"]),), 0.4)) and "mask" not in batch
