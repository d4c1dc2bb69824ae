"""A plain (non-editable) `pip install .` carries the configs and the embedded fact sets: `mansu`
composes its config and finds its data from any folder, in a fresh virtual environment that sees
nothing of this checkout."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv holding the built wheel; the dependencies come from this environment's
    site-packages as a plain path (its .pth files, the editable install among them, are not run)."""
    work = tmp_path_factory.mktemp("install")
    # Built from a copy, so the checkout gets no build/ folder.
    source = work / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "outputs", "build", "*.egg-info", "__pycache__", ".*_cache"))
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(wheels), str(source)],
                   check=True, capture_output=True, text=True)
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=False)
    purelib = next((env_dir / "lib").glob("python*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(purelib), *map(str, wheels.glob("mansu-*.whl"))],
                   check=True, capture_output=True, text=True)
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return env_dir


def in_fresh_venv(env_dir: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MANSU_OUTPUTS")}
    return subprocess.run([str(env_dir / "bin" / "python"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_installed_package_is_not_the_checkout(fresh_venv, tmp_path):
    out = in_fresh_venv(fresh_venv, ["-c", "import mansu, baselines; print(mansu.__file__)"],
                        tmp_path)
    assert out.returncode == 0, out.stderr
    assert str(fresh_venv) in out.stdout and str(ROOT) not in out.stdout


def test_mansu_finds_its_configs_from_any_folder(fresh_venv, tmp_path):
    out = in_fresh_venv(fresh_venv, ["-m", "mansu", "--cfg", "job", "model=smollm2_135m",
                                     "benchmark=smollm2_facts", "method=mansu"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "_target_: mansu.unlearn.mansu.unlearn" in out.stdout
    assert "_target_: mansu.benchmarks.real_facts.build" in out.stdout


def test_installed_package_carries_the_embedded_fact_sets(fresh_venv, tmp_path):
    code = ("from mansu.benchmarks.real_facts import build; b = build(); "
            "print(len(b.forget.questions), len(b.retain.questions))")
    out = in_fresh_venv(fresh_venv, ["-c", code], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    forget, retain = map(int, out.stdout.split())
    assert forget > 0 and retain > 0
