"""Which namespaces belong to a lab, and where a lab lives."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.lab import netns
from shoal.lab.lab import Lab


def test_a_lab_never_claims_the_namespaces_of_a_lab_with_a_longer_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("shoal-a-sw", "shoal-a-node1", "shoal-a-node12", "shoal-a-b-sw", "shoal-a-b-node1", "shoal-ab-node1", "other"):
        (tmp_path / name).touch()
    monkeypatch.setattr(netns, "NETNS_DIR", tmp_path)
    assert netns.list_netns("shoal-a-") == ["shoal-a-node1", "shoal-a-node12", "shoal-a-sw"]
    assert netns.list_netns("shoal-a-b-") == ["shoal-a-b-node1", "shoal-a-b-sw"]


def test_a_relative_lab_directory_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Lab("rel").dir == tmp_path / "rel"
