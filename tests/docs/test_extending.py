"""docs/extending.md: every recipe block runs, in order, in one namespace; the registries are restored after."""

import re

import pytest

from lightning_ddpm.backbones import BACKBONES
from lightning_ddpm.core.losses import LOSSES
from lightning_ddpm.core.parameterizations import PARAMETERIZATIONS
from lightning_ddpm.core.schedules import SCHEDULES
from lightning_ddpm.core.weightings import LOSS_WEIGHTINGS
from lightning_ddpm.samplers import SAMPLERS
from tests.helpers import ROOT

PAGE = ROOT / "docs" / "extending.md"


@pytest.fixture
def registries(monkeypatch):
    """The recipes register components; the registry-driven tests elsewhere must not see them."""
    for registry in (BACKBONES, SCHEDULES, PARAMETERIZATIONS, LOSSES, LOSS_WEIGHTINGS, SAMPLERS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))


def test_every_extension_point_has_a_recipe():
    headings = re.findall(r"^## (.+)$", PAGE.read_text(), flags=re.M)
    for point in (
        "backbone",
        "noise schedule",
        "parameterization",
        "loss weighting",
        "sampler",
        "callback",
        "DataModule",
    ):
        assert any(point in h for h in headings), point


def test_the_recipes_run(registries):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 7
    scope: dict = {"__name__": "extending_recipes"}
    for i, block in enumerate(blocks):
        try:
            exec(block, scope)  # the page's own code
        except Exception as err:
            raise AssertionError(f"recipe {i + 1} of docs/extending.md failed: {err!r}") from err
    assert "recipe_mlp" in BACKBONES and "recipe_x0_jump" in SAMPLERS.names()
