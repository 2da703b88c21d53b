"""The configs shipped in the package: ``--config NAME`` resolves one outside a clone, and ``lightning-ddpm configs``
lists them and copies them out for editing."""

from pathlib import Path

import pytest

from lightning_ddpm.cli import CLIError, main
from lightning_ddpm.cli.configs import resolve_config_args, shipped_configs

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_of_the_repository_is_shipped():
    shipped = shipped_configs()
    assert sorted(shipped) == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert all(
        path.is_file() and path.parent.name == "configs" and path.parent.parent.name == "lightning_ddpm"
        for path in shipped.values()
    )


def test_a_bare_name_resolves_to_the_shipped_config_and_files_win(tmp_path, monkeypatch):
    toy = str(shipped_configs()["toy2d"])
    monkeypatch.chdir(tmp_path)
    assert resolve_config_args(["fit", "--config", "toy2d", "--trainer.max_steps=2"]) == [
        "fit",
        "--config",
        toy,
        "--trainer.max_steps=2",
    ]
    assert resolve_config_args(["fit", "--config=toy2d.yaml"]) == ["fit", f"--config={toy}"]
    # a path, a name that is not shipped, and a file of that name in the working directory are left alone
    assert resolve_config_args(["fit", "--config", "configs/toy2d.yaml"]) == ["fit", "--config", "configs/toy2d.yaml"]
    assert resolve_config_args(["fit", "--config", "mine"]) == ["fit", "--config", "mine"]
    (tmp_path / "toy2d").write_text("trainer: {}\n")
    assert resolve_config_args(["fit", "--config", "toy2d"]) == ["fit", "--config", "toy2d"]


def test_configs_lists_and_copies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["configs"])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(shipped_configs())
    assert any(line.startswith("toy2d ") and "quick start" in line for line in listed)
    main(["configs", "copy", "toy2d", "digits", "--to", "mine"])
    for name in ("toy2d", "digits"):
        assert (tmp_path / "mine" / f"{name}.yaml").read_bytes() == shipped_configs()[name].read_bytes()
    main(["configs", "copy"])  # all of them, into ./configs
    assert sorted(p.stem for p in (tmp_path / "configs").glob("*.yaml")) == sorted(shipped_configs())
    with pytest.raises(SystemExit):  # an edited copy is not overwritten without --force
        main(["configs", "copy", "toy2d"])
    assert "configs/toy2d.yaml exists; pass --force to overwrite it" in capsys.readouterr().err
    main(["configs", "copy", "toy2d", "--force"])
    with pytest.raises(SystemExit):
        main(["configs", "copy", "toy3d"])
    assert "unknown config 'toy3d'; shipped configs: cifar10_cond" in capsys.readouterr().err


def test_a_missing_config_suggests_the_shipped_one(tmp_path, monkeypatch):
    from lightning_ddpm.cli import run_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        CLIError, match=r"File does not exist: .*toydd'; did you mean the shipped config, --config toy2d\?"
    ):
        run_cli(["fit", "--config", "toydd"])
    with pytest.raises(CLIError, match=r"a shipped config is named without a path \(--config toy2d"):
        run_cli(["fit", "--config", "nothing_like_it.yaml"])
