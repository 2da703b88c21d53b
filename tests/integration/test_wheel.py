"""The package as `pip install lightning-ddpm` gives it, outside a clone: ``python -m build`` makes a wheel and an
sdist; the wheel, installed into a fresh virtual environment, ships the configs and ``py.typed``, reports its
version, and runs the quick start by a config's name from a folder that is not the repository.

The fresh environment borrows this one's dependencies through a ``.pth`` file (torch is gigabytes; nothing
else of this environment is visible there: a ``.pth`` file's folder is not itself scanned for ``.pth`` files,
so this checkout's editable install is not)."""

import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import lightning_ddpm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out


def test_build_makes_a_wheel_and_an_sdist_with_the_configs_and_py_typed(dist):
    wheel = next(dist.glob("lightning_ddpm-*.whl"))
    sdist = next(dist.glob("lightning_ddpm-*.tar.gz"))
    version = lightning_ddpm.__version__
    assert wheel.name.startswith(f"lightning_ddpm-{version}-") and sdist.name == f"lightning_ddpm-{version}.tar.gz"
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {f"lightning_ddpm/configs/{name}" for name in configs} <= names
    assert "lightning_ddpm/py.typed" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    in_sdist = {Path(*Path(n).parts[1:]).as_posix() for n in tarfile.open(sdist).getnames()}
    assert {"LICENSE", "README.md", "pyproject.toml", "lightning_ddpm/py.typed"} <= in_sdist
    assert {f"lightning_ddpm/configs/{name}" for name in configs} <= in_sdist


def test_the_wheel_runs_the_quick_start_outside_the_repository(dist, tmp_path):
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    python = env / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    borrowed = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (purelib / "borrowed_dependencies.pth").write_text("\n".join(borrowed) + "\n")
    wheel = next(dist.glob("lightning_ddpm-*.whl"))
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    work = tmp_path / "work"  # not the repository: no configs/ folder, no lightning_ddpm/ beside it
    work.mkdir()

    def run(*args: str) -> str:
        result = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    where = run(
        str(python),
        "-c",
        "import lightning_ddpm, importlib.metadata as m; "
        "print(lightning_ddpm.__file__); print(m.version('lightning-ddpm'))",
    ).split()
    assert Path(where[0]).is_relative_to(env) and where[1] == lightning_ddpm.__version__
    console = str(env / "bin" / "lightning-ddpm")
    assert run(console, "--version").startswith(f"lightning-ddpm {lightning_ddpm.__version__} (torch ")
    run(
        console,
        "fit",
        "--config",
        "toy2d",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--data.init_args.num_train=512",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={work / 'run'}",
    )
    assert (work / "run" / "checkpoints" / "last.ckpt").is_file()
    run(console, "configs", "copy", "toy2d")
    assert (work / "configs" / "toy2d.yaml").read_bytes() == (ROOT / "configs" / "toy2d.yaml").read_bytes()
