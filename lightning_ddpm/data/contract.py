"""What the command line, the module and the callbacks ask of a data module (a Protocol).

Any ``LightningDataModule`` with these members works with ``lightning-ddpm`` and ``DiffusionModule``;
``tests/data/test_data_contract.py`` checks the shipped ones against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["DiffusionDataModule"]


@runtime_checkable
class DiffusionDataModule(Protocol):
    """A data module the CLI can link to the model.

    - ``data_shape``: the shape of one example, e.g. ``[3, 32, 32]`` or ``[2]``; the CLI links it to
      ``model.data_shape``.
    - ``num_classes``: the number of classes when batches carry labels (the model becomes
      class-conditional), else ``None``; linked to ``model.num_classes``.
    - ``train_dataloader`` / ``val_dataloader``: batches as ``unpack_batch`` reads them: a tensor, an
      ``(x, y)`` pair, or a dict with ``x``/``image``/``images`` and ``y``/``label``/``labels``; images in
      [-1, 1]; labels in ``[0, num_classes)`` are required when ``num_classes`` is set (an
      unconditional model ignores any).
    - ``predict_dataloader``: batches of requests ``{"seed": (B,), "index": (B,)[, "labels": (B,)]}``,
      sample ``i`` drawn from seed ``seed[i]`` (``lightning_ddpm.data.requests.predict_loader`` builds one).
      Edit requests (``EditRequestsDataModule``) add ``images`` (B, *data_shape) in [-1, 1] and a ``mask`` of
      the same shape (inpainting) or a ``strength`` (B,) (SDEdit), and a ``sampler`` (JSON strings).
    - optional ``reference_points(n)``: ``(n, 2)`` data points that 2-D sample pictures draw beneath.
    """

    @property
    def data_shape(self) -> Sequence[int] | None: ...

    @property
    def num_classes(self) -> int | None: ...

    def predict_dataloader(self) -> Any: ...
