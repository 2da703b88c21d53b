"""The shipped data modules keep ``lightning_ddpm.data.DiffusionDataModule``'s contract: the shape and classes
the CLI links to the model, batches the module can unpack (images in [-1, 1], labels when it has classes), and
predict requests."""

from __future__ import annotations

import pytest
import torch

from lightning_ddpm.data import DiffusionDataModule, ImageDataModule, SampleRequestsDataModule, Toy2DDataModule
from lightning_ddpm.data.batches import unpack_batch

MODULES = {
    "toy2d": lambda: Toy2DDataModule("two_moons", num_train=256, num_val=64, batch_size=32, num_predict_samples=10),
    "toy2d_labels": lambda: Toy2DDataModule(
        "eight_gaussians", num_train=256, num_val=64, batch_size=32, labels=True, num_predict_samples=10, predict_seed=7
    ),
    "digits": lambda: ImageDataModule("digits", batch_size=16, num_predict_samples=10),
    "digits_labels": lambda: ImageDataModule("digits", batch_size=16, labels=True, num_predict_samples=10),
    "requests": lambda: SampleRequestsDataModule(
        num_predict_samples=10, batch_size=4, data_shape=[3, 8, 8], num_classes=3, predict_seed=7
    ),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_shipped_data_module_keeps_the_contract(name):
    data = MODULES[name]()
    assert isinstance(data, DiffusionDataModule)
    shape, classes = list(data.data_shape), data.num_classes
    assert shape and all(isinstance(s, int) and s > 0 for s in shape)
    assert classes is None or classes >= 1
    if name != "requests":  # training data: batches unpack to data_shape, labels iff the module has classes
        for loader in (data.train_dataloader(), data.val_dataloader()):
            x, y = unpack_batch(next(iter(loader)), shape)
            assert x.dtype == torch.float32
            if len(shape) == 3:
                assert x.min() >= -1 and x.max() <= 1, "images in [-1, 1]"
            if classes is not None:  # labels are required then (an unconditional model ignores any)
                assert y is not None and y.min() >= 0 and y.max() < classes
    requests = [b for b in data.predict_dataloader()]
    index = torch.cat([b["index"] for b in requests])
    seed = torch.cat([b["seed"] for b in requests])
    assert index.tolist() == list(range(data.num_predict_samples))
    assert torch.equal(seed, index + data.predict_seed)
    if classes is not None:  # every class in turn unless labels were asked for
        labels = torch.cat([b["labels"] for b in requests])
        assert labels.tolist() == [i % classes for i in range(data.num_predict_samples)]
    else:
        assert all("labels" not in b for b in requests)
    if hasattr(data, "reference_points"):
        points = data.reference_points(50)
        assert points.shape == (50, 2) and shape == [2]
