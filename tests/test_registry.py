"""Every name -> object table is one Registry: the same wording for unknown and taken names."""

import pytest
import torch

from lightning_ddpm.backbones import registry as backbones
from lightning_ddpm.data.images import IMAGE_DATASETS
from lightning_ddpm.data.toy2d import TOY_DISTRIBUTIONS
from lightning_ddpm.parameterizations import _PARAMETERIZATIONS
from lightning_ddpm.registry import Registry
from lightning_ddpm.samplers import SAMPLERS
from lightning_ddpm.schedules import _SCHEDULES
from lightning_ddpm.timestep_sampling import TIMESTEP_SAMPLERS

REGISTRIES = {
    "schedule": _SCHEDULES, "parameterization": _PARAMETERIZATIONS, "sampler": SAMPLERS,
    "timestep_sampler": TIMESTEP_SAMPLERS, "backbone": backbones._REGISTRY, "distribution": TOY_DISTRIBUTIONS,
    "dataset": IMAGE_DATASETS,
}


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_registry_words_unknown_and_taken_names_alike(kind):
    registry = REGISTRIES[kind]
    assert isinstance(registry, Registry) and registry.kind == kind and len(registry) >= 2
    with pytest.raises(ValueError, match=rf"^unknown {kind} 'nope'; choose one of: {', '.join(registry.names())}"):
        registry.get("nope")
    taken = registry.names()[0]
    with pytest.raises(ValueError, match=rf"^{kind} name '{taken}' is already registered .*registered: "):
        registry.copy().register(taken, object())


def test_registering_the_same_definition_again_replaces_it():
    registry = Registry("thing")
    namespace = {"__name__": "__main__"}
    for _ in range(2):  # a notebook cell run twice
        exec("def make():\n    return 1\n", namespace)
        registry.register("make", namespace["make"])
    assert registry.get("make") is namespace["make"] and registry.names() == ["make"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("make", lambda: 2)


@pytest.mark.parametrize("name", TIMESTEP_SAMPLERS.names())
def test_every_timestep_sampler_draws_valid_timesteps_with_unbiased_weights(name):
    sampler = TIMESTEP_SAMPLERS.get(name)(10)
    t, weights = sampler.sample(20_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.shape == weights.shape == (20_000,) and t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 10
    assert (weights > 0).all()
    per_t = torch.arange(10, dtype=torch.float32)  # E_p[w * L(t)] must equal the uniform mean of L
    assert (weights * per_t[t]).mean().item() == pytest.approx(per_t.mean().item(), rel=0.03)
