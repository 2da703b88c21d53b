"""A callback and its config round-trip: every public callback rebuilt from its ``{class_path, init_args}`` (by
hand, and through jsonargparse as the command line and its saved config.yaml do) has the same spec."""

import inspect

import lightning.pytorch as pl
import pytest
import yaml
from jsonargparse import ArgumentParser

import lightning_ddpm.callbacks as callbacks
from lightning_ddpm.callbacks.config import Configurable, from_spec

# Options other than the defaults, in the plain data a config holds.
OPTIONS = {
    "EMA": {"decay": 0.99, "warmup": False, "update_every_n_steps": 2, "start_step": 10},
    "FIDCallback": {
        "num_samples": 8,
        "every_n_validations": 2,
        "at_train_end": True,
        "final_num_samples": 16,
        "sampler": {"name": "ddpm", "init_args": {"num_steps": 5}},
        "final_sampler": "dpmpp_2m",
        "batch_size": 4,
        "kid": True,
        "kid_subset_size": 4,
        "seed": 3,
    },
    "BitsPerDimCallback": {"num_examples": 16, "every_n_validations": 3, "batch_size": 8, "seed": 2},
    "SampleWriter": {"output_dir": "out"},
    "PostHocEMA": {
        "sigma_rels": [0.04, 0.12, 0.2],
        "snapshot_every_n_steps": 50,
        "snapshot_dir": "snapshots",
        "snapshot_dtype": "bfloat16",
    },
    "SampleLogger": {
        "every_n_steps": 5,
        "every_n_epochs": None,
        "num_samples": 9,
        "sampler": "ddim",
        "seed": 1,
        "output_dir": "pictures",
    },
}
PUBLIC = [
    name
    for name in callbacks.__all__
    if inspect.isclass(getattr(callbacks, name)) and issubclass(getattr(callbacks, name), pl.Callback)
]


def test_every_public_callback_is_covered():
    assert sorted(PUBLIC) == sorted(OPTIONS)


@pytest.mark.parametrize("name", PUBLIC)
def test_a_callback_rebuilt_from_its_spec_is_the_same(name):
    cls = getattr(callbacks, name)
    assert issubclass(cls, Configurable)
    callback = cls(**OPTIONS[name])
    spec = callback.spec()
    assert spec["class_path"] == f"lightning_ddpm.callbacks.{name}"  # the path configs use
    assert set(spec["init_args"]) == set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert {k: spec["init_args"][k] for k in OPTIONS[name]} == OPTIONS[name]
    assert from_spec(spec).spec() == spec
    # through jsonargparse, as `lightning-ddpm fit` builds trainer.callbacks, and again from the saved config
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[pl.Callback])
    config = parser.parse_object({"callbacks": [{"class_path": spec["class_path"], "init_args": OPTIONS[name]}]})
    saved = yaml.safe_load(parser.dump(config, skip_none=False))  # as LightningCLI saves config.yaml
    for parsed in (config, parser.parse_object(saved)):
        built = getattr(parser, "instantiate", parser.instantiate_classes)(parsed).callbacks[0]
        assert type(built) is cls and built.spec() == spec


class Subclassed(callbacks.SampleLogger):
    """A user's callback with its own arguments: the outermost constructor's are the ones recorded."""

    def __init__(self, tag: str = "x", **kwargs) -> None:
        super().__init__(num_samples=4, **kwargs)
        self.tag = tag


def test_a_subclass_records_its_own_arguments():
    spec = Subclassed(tag="y", seed=5).spec()
    assert spec == {"class_path": "tests.callbacks.test_config.Subclassed", "init_args": {"tag": "y", "seed": 5}}
    again = from_spec(spec)
    assert again.tag == "y" and again.seed == 5 and again.num_samples == 4 and again.spec() == spec
