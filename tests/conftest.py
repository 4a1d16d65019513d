"""Fixtures shared by every tier. Tools a test needs and cannot find make it fail with
a sentence naming what to install: ``./run setup`` installs all of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.volume import format_volume


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install the Debian package {package} (./run setup does it)")
    return path


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"this test needs root to {why}; run the suite as root (./run test)")


def shoal(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real ``shoal`` command in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"shoal {' '.join(args)} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
    return proc


def assert_no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out


@pytest.fixture
def volume_path(tmp_path: Path) -> str:
    path = str(tmp_path / "vol.img")
    format_volume(path, 256 << 20, name="testvol")
    return path


@pytest.fixture
def small_unit_volume(tmp_path: Path) -> str:
    path = str(tmp_path / "vol64k.img")
    format_volume(path, 64 << 20, unit_size=64 << 10, name="small")
    return path
