"""A non-editable install (a wheel, as Ray workers and clusters use) holds every file hetsim reads at run time."""

import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT


def package_data() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]


def test_package_data_names_every_data_file_of_the_package_and_nothing_else():
    for package in ("hetsim", "backends"):
        patterns = package_data().get(package, [])
        root = ROOT / package
        for pattern in patterns:
            assert list(root.glob(pattern)), f"package-data {package}: {pattern!r} matches no file"
        data = [p for p in root.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
                and "__pycache__" not in p.parts]
        missed = [str(p.relative_to(root)) for p in data if not any(p.match(str(root / pat)) for pat in patterns)]
        assert not missed, f"{package} files a wheel would lack: {missed}"
    assert "quickstart.toml" in package_data()["hetsim"]  # what `hetsim quickstart` reads


def _setuptools_builds_offline() -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= 77  # PEP 639 license string
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.packaging
@pytest.mark.skipif(not _setuptools_builds_offline(), reason="needs setuptools>=77 here (pip install -e '.[test]')")
def test_the_wheel_runs_the_quickstart_from_a_fresh_venv(tmp_path):
    # build from a copy of the sources, so that the checkout gets no build/ or egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("hetsim", "backends"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def sh(*cmd, cwd=tmp_path):
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout

    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist",
       src)
    (wheel,) = (tmp_path / "dist").glob("hetsim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"hetsim/quickstart.toml", "hetsim/profiles/assumed-cpu.json", "hetsim/profiles/FORMAT.md"} <= set(names)

    # a fresh venv that reuses this environment's packages (torch & co.) but not its hetsim: a .pth line
    # adds this environment's site-packages after the venv's own, and .pth files found there (such as an
    # editable install's hook) are not run
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    outer = [*site.getsitepackages(), site.getusersitepackages()]
    (purelib / "outer_packages.pth").write_text("\n".join(p for p in outer if Path(p).is_dir()) + "\n")
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel)
    assert sh(python, "-c", "import hetsim; print(hetsim.__file__)").startswith(str(purelib))

    work = tmp_path / "elsewhere"  # outside the checkout: no examples/ or hetsim/ next to it
    work.mkdir()
    sh(venv / "bin" / "hetsim", "quickstart", "--seeds", "1", "--set", "stop.max_rounds=1", "--out", "q", cwd=work)
    assert (work / "q" / "figures" / "speedups.md").is_file()
    assert len(list((work / "q" / "runs").iterdir())) == 5
