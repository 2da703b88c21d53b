import math

import pytest
import torch

from lightning_ddpm.training.metrics import TimestepLosses


# flush_every: update folds the pending batches into the sums every so many calls; the result cannot depend on it
@pytest.mark.parametrize("flush_every", [1, 2, 32])
def test_timestep_losses_pool_batches_and_ignore_non_finite_examples(flush_every):
    metric = TimestepLosses(num_timesteps=8, flush_every=flush_every)
    batches = [
        # (per-example losses, t, weighted batch loss, vlb)
        (
            torch.tensor([1.0, 2.0, 3.0, 4.0]),
            torch.tensor([0, 2, 4, 6]),
            torch.tensor(2.5),
            torch.tensor([1.0, 1, 1, 1]),
        ),
        (
            torch.tensor([5.0, float("nan"), 7.0]),
            torch.tensor([1, 5, 7]),
            torch.tensor(float("nan")),
            torch.tensor([2.0, float("inf"), 2.0]),
        ),
        (torch.tensor([9.0, 11.0]), torch.tensor([3, 3]), torch.tensor(10.0), torch.tensor([4.0, 4.0])),
    ]
    for losses, t, loss, vlb in batches:
        metric.update(losses, t, loss, vlb)
    out = {k: v.item() for k, v in metric.compute().items()}
    # quartiles of t in [0, 8): {0,1}, {2,3}, {4,5}, {6,7}; the NaN example (t = 5) is left out
    for key, want in (
        ("loss_q0", (1 + 5) / 2),
        ("loss_q1", (2 + 9 + 11) / 3),
        ("loss_q2", 3.0),
        ("loss_q3", (4 + 7) / 2),
    ):
        assert math.isclose(out[key], want, rel_tol=1e-6), key
    # the batch losses weighted by batch size; the NaN batch is skipped as a whole
    assert math.isclose(out["loss"], (2.5 * 4 + 10.0 * 2) / 6, rel_tol=1e-6)
    assert math.isclose(out["vlb"], (4 * 1.0 + 2 * 2.0 + 2 * 4.0) / 8, rel_tol=1e-6)


def test_timestep_losses_leave_out_empty_bins_and_vlb_when_not_given():
    metric = TimestepLosses(num_timesteps=100)
    metric.update(torch.tensor([1.0, 3.0]), torch.tensor([10, 20]), torch.tensor(2.0))
    assert set(metric.compute()) == {"loss_q0", "loss"}


def test_timestep_losses_reset_drops_pending_batches_and_device_moves_keep_them():
    metric = TimestepLosses(num_timesteps=100)
    metric.update(torch.tensor([1.0]), torch.tensor([10]), torch.tensor(1.0))
    metric.reset()
    metric.update(torch.tensor([3.0]), torch.tensor([10]), torch.tensor(3.0))
    metric.to("cpu")  # a move folds what is pending into the state first (on a GPU it would stay behind)
    assert metric.totals[:, 4].tolist() == [3.0, 1.0]  # the batch loss column: [sum, count]
    assert metric.compute()["loss"].item() == 3.0
