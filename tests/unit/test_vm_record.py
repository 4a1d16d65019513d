"""VM records: validation sentences, the two-slot file format, placement."""

from __future__ import annotations

import pytest

from shoal.errors import UsageError
from shoal.vm.placement import choose_node
from shoal.vm.record import (
    SLOT_SIZE,
    DiskSpec,
    RecordCorrupt,
    VMRecord,
    VMSpec,
    decode_file,
    encode_slot,
    slot_offset,
)


def spec(**kw: object) -> VMSpec:
    base: dict[str, object] = {"name": "web1", "memory_mib": 128, "disks": (DiskSpec("vol1", "/vms/web1.raw"),)}
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def test_record_round_trips_through_dict() -> None:
    rec = VMRecord(spec=spec(preferred_owners=("node2",), migration_networks=("public",)), owner="node1",
                   desired="running")
    assert VMRecord.from_dict(rec.to_dict()) == rec


def test_changed_bumps_generation_and_remembers_owner_changes() -> None:
    rec = VMRecord(spec=spec(), owner="node1", desired="running")
    moved = rec.changed(t=5.0, owner="node2", note="live migration from node1")
    assert moved.gen == rec.gen + 1
    assert moved.history[-1] == {"t": 5.0, "owner": "node2", "why": "live migration from node1"}
    assert moved.changed(desired="stopped").history == moved.history


@pytest.mark.parametrize("kw, words", [
    ({"name": "Bad Name"}, "not a valid VM name"),
    ({"memory_mib": 4}, "at least 16 MiB"),
    ({"disks": ()}, "at least one --disk"),
    ({"disks": (DiskSpec("vol9", "/a"),)}, "does not declare"),
    ({"preferred_owners": ("node9",)}, "not a node"),
    ({"migration_networks": ("wan",)}, "not a network"),
    ({"test_guest": "cpu"}, "--test-guest must be one of"),
])
def test_validation_says_what_is_wrong(kw: dict[str, object], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        spec(**kw).validate(nodes=["node1", "node2"], networks=["cluster", "public"], volumes=["vol1"])


def test_newest_valid_slot_wins_and_a_torn_slot_is_skipped() -> None:
    raw = bytearray(2 * SLOT_SIZE)
    for seq in (1, 2, 3):
        raw[slot_offset(seq):slot_offset(seq) + SLOT_SIZE] = encode_slot(seq, {"seq": seq})
    assert decode_file(bytes(raw)) == (3, {"seq": 3})
    raw[slot_offset(3) + 30] ^= 0xFF  # slot of seq 3 torn by a crash: seq 2 survives
    assert decode_file(bytes(raw)) == (2, {"seq": 2})
    with pytest.raises(RecordCorrupt):
        decode_file(bytes(2 * SLOT_SIZE))


def test_oversized_record_is_refused_with_a_sentence() -> None:
    with pytest.raises(UsageError, match="at most"):
        encode_slot(1, {"x": "y" * SLOT_SIZE})


def test_placement_prefers_owners_in_order_then_the_least_loaded() -> None:
    assert choose_node(["node3", "node2"], ["node1", "node2", "node3"], {}) == "node3"
    assert choose_node(["node3", "node2"], ["node1", "node2"], {}) == "node2"
    assert choose_node([], ["node1", "node2", "node3"], {"node1": 2, "node2": 1, "node3": 1}) == "node2"
    assert choose_node(["node9"], [], {}) is None
