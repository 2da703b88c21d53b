"""The documentation site's own promises: its Python examples run, and every page is in the navigation."""

import re
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_the_getting_started_examples_run():
    math, lightning = _python_blocks("index.md")
    scope: dict = {}
    exec(math, scope)  # the page's own code
    assert scope["samples"].shape == scope["x0"].shape and torch.isfinite(scope["loss"])
    # the Lightning block, shortened from 3000 steps to 20 (the page says what it trains)
    assert "max_steps=3000" in lightning
    scope = {}
    exec(
        lightning.replace(
            "max_steps=3000", "max_steps=20, logger=False, enable_progress_bar=False, enable_checkpointing=False"
        ),
        scope,
    )
    assert scope["samples"].shape == (512, 2) and torch.isfinite(scope["samples"]).all()


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for entry in nav:
            for value in entry.values() if isinstance(entry, dict) else [entry]:
                yield from pages(value) if isinstance(value, list) else [value]

    assert sorted(pages(config["nav"])) == sorted(p.name for p in DOCS.glob("*.md"))


def test_the_readme_python_block_runs():
    """The README's "In Python" block, its training shortened from 3000 steps to 20."""
    (block,) = re.findall(r"## In Python\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert "max_steps=3000" in block
    scope: dict = {}
    exec(
        block.replace(
            "max_steps=3000", "max_steps=20, logger=False, enable_progress_bar=False, enable_checkpointing=False"
        ),
        scope,
    )
    assert scope["samples"].shape == (512, 2) and torch.isfinite(scope["samples"]).all()
    assert torch.isfinite(scope["loss"])
