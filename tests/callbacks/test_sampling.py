"""The callbacks' shared sampling (callbacks/sampling.py): sample i from seed + i alone, each rank its block, so the
generated set is the same at any world size. Ranks are simulated with a stand-in trainer (global_rank, world_size):
the samples do not depend on anything else, and a 2-process run of each case would take minutes here."""

from types import SimpleNamespace

import pytest
import torch

from lightning_ddpm import DDIMSampler, DiffusionModule
from lightning_ddpm.callbacks import BitsPerDimCallback, FIDCallback
from lightning_ddpm.callbacks.sampling import draw_samples, iter_samples, rank_share, sample_generators
from tests.helpers import TINY_MLP, TinyFeatures

TINY_UNET = {
    "name": "unet",
    "init_args": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
}


def _rank(rank: int, world_size: int) -> SimpleNamespace:
    """What the sampling and FID's evaluate read of a trainer, for one rank of ``world_size``."""
    return SimpleNamespace(
        global_rank=rank,
        world_size=world_size,
        is_global_zero=rank == 0,
        callbacks=[],
        progress_bar_callback=None,
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),
    )


def _set(module, world_size: int, num: int, **kw) -> tuple[torch.Tensor, list[int]]:
    """The samples every rank keeps, in rank order, and their indices."""
    kept, index = [], []
    for rank in range(world_size):
        for drawn in iter_samples(_rank(rank, world_size), module, num, **kw):
            kept.append(drawn.samples[: drawn.real])
            index += drawn.index[: drawn.real]
    return torch.cat(kept), index


@pytest.mark.parametrize("seed", [0, 100_037])
def test_the_noise_of_consecutive_seeds_is_independent(seed):
    """seed + i gives neighbouring samples neighbouring seeds; their noise shows no dependence: the lag-1
    cross-correlations of the 64 coordinates (and of their squares) over 12000 samples are z-scores of mean
    square 1 (standard error 0.022 under independence), and every coordinate is standard normal (benchmarks/
    noise_rules.py measures what the rule does to sample scores). A shared or repeated generator fails this."""
    n = 12_000
    x = torch.cat([torch.randn(1, 64, generator=g) for g in sample_generators(range(n + 1), seed, "cpu")]).double()
    assert x.mean(0).abs().max() < 5 / n**0.5 and (x.var(0) - 1).abs().max() < 5 * (2 / n) ** 0.5

    def z(a, b):
        a, b = (a - a.mean(0)) / a.std(0), (b - b.mean(0)) / b.std(0)
        return a.T @ b / n**0.5

    for f in (lambda v: v, torch.square):
        lag1 = z(f(x[:-1]), f(x[1:]))
        assert abs(float(lag1.square().mean()) - 1) < 0.1 and float(lag1.abs().max()) < 5.5


def test_rank_share_is_contiguous_blocks_padded_with_the_last_index():
    assert rank_share(7, 0, 2) == ([0, 1, 2, 3], 4) and rank_share(7, 1, 2) == ([4, 5, 6, 6], 3)
    assert rank_share(5, 3, 4) == ([4, 4], 0)  # a rank past the end repeats the last sample and keeps none
    assert rank_share(5, 0, 1) == ([0, 1, 2, 3, 4], 5)


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_samples_are_the_same_at_any_world_size(world_size):
    torch.manual_seed(0)
    module = DiffusionModule(backbone=TINY_MLP, data_shape=[2], num_timesteps=20)
    kw = {"sampler": DDIMSampler(num_steps=3), "seed": 11, "batch_size": 3}
    alone, index = _set(module, 1, 7, **kw)
    shared, shared_index = _set(module, world_size, 7, **kw)
    assert index == shared_index == list(range(7))
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-6)
    # sample i is what one generator seeded 11 + i gives, alone
    one = module.sample(1, sampler=DDIMSampler(num_steps=3), generator=[torch.Generator().manual_seed(11 + 4)])
    torch.testing.assert_close(alone[4:5], one, rtol=1e-5, atol=1e-6)
    whole = draw_samples(_rank(0, 1), module, 7, **kw)
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-6)


def test_random_labels_are_drawn_per_sample():
    torch.manual_seed(0)
    module = DiffusionModule(backbone=TINY_MLP, data_shape=[2], num_timesteps=20, num_classes=3)
    seen = []
    sample = module.sample

    def recording(*args, **kwargs):
        seen.extend(kwargs["labels"].tolist())
        return sample(*args, **kwargs)

    module.sample = recording
    kw = {"sampler": DDIMSampler(num_steps=2), "seed": 3, "labels": "random", "batch_size": 4}
    alone = _set(module, 1, 9, **kw)[0]
    labels_alone, seen[:] = list(seen), []
    shared = _set(module, 2, 9, **kw)[0]
    labels_shared = list(seen)
    assert labels_shared[:9] == labels_alone  # rank 0: samples 0..4, rank 1: 5..8 (then its pad)
    assert len(set(labels_alone)) > 1
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-6)


def test_fid_generates_the_same_images_at_any_world_size():
    """FIDCallback's generated images, gathered in rank order, are the same with 1 and 2 ranks (rank r used to
    draw from seed + r, so the set changed with the number of ranks); and so is the count, exactly N."""
    torch.manual_seed(0)
    module = DiffusionModule(
        backbone=TINY_UNET, data_shape=[1, 8, 8], num_timesteps=20, clip_denoised=True, num_classes=2
    )
    real = torch.rand(16, 1, 8, 8) * 2 - 1

    def generated(world_size: int) -> torch.Tensor:
        fid = FIDCallback(
            num_samples=7, batch_size=3, feature_extractor=TinyFeatures(), sampler=DDIMSampler(num_steps=2), seed=5
        )
        fid.build_metrics()
        fid._update(real, real=True)
        update, images = fid._update, []

        def recording(batch, real):
            images.append(batch)
            update(batch, real)

        fid._update = recording
        for rank in range(world_size):
            fid.evaluate(_rank(rank, world_size), module, 7)
        return torch.cat(images)

    alone, shared = generated(1), generated(2)
    assert alone.shape == shared.shape == (7, 1, 8, 8)
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-6)


def test_per_example_generators_make_the_forward_noise_and_bits_per_dim_independent_of_the_batch():
    """q_sample and bits/dim take one generator per example: example i's draws come from generators[i] alone."""
    module = DiffusionModule(backbone=TINY_UNET, data_shape=[1, 8, 8], num_timesteps=6)
    x0 = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([0, 1, 2, 3, 5])
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    together = module.diffusion.q_sample(x0, t, generator=gens(range(5)))
    alone = torch.cat([module.diffusion.q_sample(x0[i : i + 1], t[i : i + 1], generator=gens([i])) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)
    with torch.no_grad():
        batched = module.diffusion.bits_per_dim(module.denoiser(), x0, generator=gens(range(5)))
        split = torch.cat(
            [
                module.diffusion.bits_per_dim(module.denoiser(), x0[i : i + 2], generator=gens(range(i, i + 2)))
                for i in (0, 2)
            ]
            + [module.diffusion.bits_per_dim(module.denoiser(), x0[4:], generator=gens([4]))]
        )
    torch.testing.assert_close(batched, split, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="got 2 generators for a batch of 5"):
        module.diffusion.q_sample(x0, t, generator=gens(range(2)))


@pytest.mark.parametrize("num_examples", [7, 40])
def test_bits_per_dim_is_the_same_at_any_world_size(num_examples):
    """BitsPerDimCallback: the first num_examples validation examples over all ranks, example i noised from
    seed + i, so the per-example values and their mean do not depend on the world size (ranks dealt the data
    as Lightning's distributed sampler deals it; 40 > the 30 examples: the sampler's padding must not count)."""
    torch.manual_seed(0)
    module = DiffusionModule(backbone=TINY_UNET, data_shape=[1, 8, 8], num_timesteps=6)
    data = torch.utils.data.TensorDataset(torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1)

    def per_example(world_size: int) -> dict[int, float]:
        values = {}
        for rank in range(world_size):
            sampler = torch.utils.data.DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False)
            loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
            trainer = SimpleNamespace(**vars(_rank(rank, world_size)), sanity_checking=False, val_dataloaders=loader)
            bpd = BitsPerDimCallback(num_examples=num_examples, batch_size=3, seed=5)
            for i, batch in enumerate(loader):
                bpd.on_validation_batch_end(trainer, module, None, batch, i)
            index, values_ = bpd.per_example(trainer, module)
            assert not set(index) & set(values), "an example counted on two ranks"
            values.update(zip(index, values_.tolist()))
        return values

    one = per_example(1)
    assert sorted(one) == list(range(min(num_examples, 30)))
    for world_size in (2, 3, 4):
        other = per_example(world_size)
        assert sorted(other) == sorted(one)
        torch.testing.assert_close(
            torch.tensor([other[i] for i in sorted(one)]),
            torch.tensor([one[i] for i in sorted(one)]),
            rtol=1e-6,
            atol=1e-6,
        )


def test_bits_per_dim_counts_the_runs_validations_across_a_resume():
    """every_n_validations counts the run's validations: the counter is in the callback's checkpoint state, so a
    callback restored after validation 1 evaluates at validation 2, 4, ... as the uninterrupted one does."""
    trainer = SimpleNamespace(**vars(_rank(0, 1)), sanity_checking=False)
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda *a, **k: None)

    def run(callback: BitsPerDimCallback, first: int, last: int) -> list[int]:
        """The run's validations first..last (counted from 1) at which the callback evaluates."""
        evaluated, current = [], [0]
        callback.per_example = lambda trainer, pl_module: (
            evaluated.append(current[0]),  # noqa: E731
            ([0], torch.ones(1, dtype=torch.float64)),
        )[1]
        for current[0] in range(first, last + 1):
            callback.on_validation_epoch_end(trainer, module)
        return evaluated

    straight = run(BitsPerDimCallback(every_n_validations=2), 1, 5)
    first = BitsPerDimCallback(every_n_validations=2)
    run(first, 1, 1)
    resumed = BitsPerDimCallback(every_n_validations=2)
    resumed.load_state_dict(first.state_dict())
    assert straight == [2, 4] and run(resumed, 2, 5) == [2, 4]
