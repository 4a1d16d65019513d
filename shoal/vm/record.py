"""A VM's definition and its cluster record, and how the record sits on a shared volume.

A VM is defined once (``VMSpec``: memory, CPUs, disks, boot, placement hints) and lives
in the cluster as a ``VMRecord``: the spec plus who owns it (``owner``, the one node
allowed to run it), whether it should run (``desired``), and a generation ``gen``
that every change bumps. Changes are compare-and-set on ``gen`` at the coordinator of
the volume that holds the record, so two nodes can never both believe they own a VM:
ownership is the record, and the record has one writer.

On the volume (the volume of the VM's first disk) each record is the file
``/.shoal/vms/<name>.vm``, 8 KiB, two 4 KiB slots written alternately, so a write
torn by a crash leaves the other slot intact. A slot, little-endian::

    offset size  field
    0      8     magic  b"SHOALVM1"
    8      8     seq    u64, +1 per write; the valid slot with the highest seq wins
    16     4     length u32, bytes of JSON that follow
    20     4     crc32  u32 of the JSON bytes
    24     n     JSON   the record (``VMRecord.to_dict``), UTF-8, n <= 4072
    24+n   ...   zeros up to 4096

Cluster-wide node flags (``paused`` after a drain) use the same format in
``/.shoal/nodes.vm`` on the cluster's first volume.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from shoal.errors import UsageError

RECORD_DIR = "/.shoal/vms"
NODES_FILE = "/.shoal/nodes.vm"
SLOT_SIZE = 4096
RECORD_FILE_SIZE = 2 * SLOT_SIZE
_MAGIC = b"SHOALVM1"
_HEAD = struct.Struct("<8sQII")
MAX_JSON = SLOT_SIZE - _HEAD.size

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
TEST_GUESTS = ("memory", "disk")
DESIRED = ("running", "stopped")
MIN_MEMORY_MIB = 16
MAX_CPUS = 64
#: how many ownership changes a record remembers (newest last)
HISTORY = 16


def record_path(name: str) -> str:
    return f"{RECORD_DIR}/{name}.vm"


def state_path(name: str) -> str:
    """Where a quick migration saves the VM's state (on the record's volume)."""
    return f"{RECORD_DIR}/{name}.state"


@dataclass(frozen=True)
class DiskSpec:
    volume: str
    path: str
    size: int = 0  # bytes to create the file with when it does not exist; 0 = must exist

    @property
    def export(self) -> str:
        """The NBD export name a node's agent serves this file under."""
        return self.path.strip("/")

    def __str__(self) -> str:
        return f"{self.volume}:{self.path}"


@dataclass(frozen=True)
class VMSpec:
    name: str
    memory_mib: int
    cpus: int = 1
    disks: tuple[DiskSpec, ...] = ()
    test_guest: str | None = None
    dirty_rate_mib_s: int = 16  # the memory test guest's target dirty rate; 0 = as fast as it can
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    cpu_model: str = "qemu64"
    preferred_owners: tuple[str, ...] = ()
    migration_networks: tuple[str, ...] = ()
    allow_postcopy: bool = False

    @property
    def volume(self) -> str:
        """The volume holding this VM's record: the one of its first disk."""
        return self.disks[0].volume

    def validate(self, nodes: list[str] | None = None, networks: list[str] | None = None,
                 volumes: list[str] | None = None) -> VMSpec:
        """Return self, or raise UsageError with one sentence per first problem found."""
        if not NAME_RE.match(self.name):
            raise UsageError(f"{self.name!r} is not a valid VM name: use 1-31 lowercase letters, digits and "
                             "dashes, starting with a letter or digit.")
        if self.memory_mib < MIN_MEMORY_MIB:
            raise UsageError(f"VM {self.name}: --memory must be at least {MIN_MEMORY_MIB} MiB.")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise UsageError(f"VM {self.name}: --cpus must be between 1 and {MAX_CPUS}.")
        if not self.disks:
            raise UsageError(f"VM {self.name} needs at least one --disk VOLUME:/path: its definition is "
                             "stored on the volume of its first disk.")
        for d in self.disks:
            if not d.path.startswith("/") or d.path.startswith(RECORD_DIR) or d.path.rstrip("/") == "":
                raise UsageError(f"VM {self.name}: disk {d} must be an absolute file path on the volume, "
                                 f"outside {RECORD_DIR}.")
            if volumes is not None and d.volume not in volumes:
                raise UsageError(f"VM {self.name}: disk {d} names volume {d.volume!r}, which the cluster does "
                                 f"not declare (known: {', '.join(volumes) or 'none'}).")
        if self.test_guest is not None and self.test_guest not in TEST_GUESTS:
            raise UsageError(f"--test-guest must be one of {', '.join(TEST_GUESTS)}, not {self.test_guest!r}.")
        if self.test_guest and self.kernel:
            raise UsageError(f"VM {self.name}: give either --test-guest or --kernel, not both.")
        if self.dirty_rate_mib_s < 0:
            raise UsageError(f"VM {self.name}: --dirty-rate must be 0 (as fast as possible) or more MiB/s.")
        for n in self.preferred_owners:
            if nodes is not None and n not in nodes:
                raise UsageError(f"VM {self.name}: preferred owner {n!r} is not a node of this cluster "
                                 f"({', '.join(nodes)}).")
        for n in self.migration_networks:
            if networks is not None and n not in networks:
                raise UsageError(f"VM {self.name}: migration network {n!r} is not a network of this cluster "
                                 f"({', '.join(networks)}).")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["disks"] = [asdict(x) for x in self.disks]
        d["preferred_owners"] = list(self.preferred_owners)
        d["migration_networks"] = list(self.migration_networks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMSpec:
        d = dict(d)
        d["disks"] = tuple(DiskSpec(**x) for x in d.get("disks", ()))
        d["preferred_owners"] = tuple(d.get("preferred_owners", ()))
        d["migration_networks"] = tuple(d.get("migration_networks", ()))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class VMRecord:
    spec: VMSpec
    owner: str | None = None
    desired: str = "stopped"
    gen: int = 1
    #: a migration under way: {"to", "mode", "since"}; both ends leave the VM alone
    migration: dict[str, Any] | None = None
    last_migration: dict[str, Any] | None = None
    #: the last ownership or state change, as a sentence
    note: str = ""
    #: ownership changes, oldest first: {"t", "owner", "why"}
    history: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.spec.name

    def changed(self, t: float = 0.0, **changes: Any) -> VMRecord:
        """The next generation of this record, with ``changes``; an owner change is
        remembered in ``history`` with the ``note`` and the wall time ``t``."""
        new = replace(self, gen=self.gen + 1, **changes)
        if new.owner != self.owner:
            entry = {"t": round(t, 3), "owner": new.owner, "why": new.note}
            new = replace(new, history=(*self.history, entry)[-HISTORY:])
        return new

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "owner": self.owner, "desired": self.desired, "gen": self.gen,
                "migration": self.migration, "last_migration": self.last_migration, "note": self.note,
                "history": list(self.history)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMRecord:
        return cls(spec=VMSpec.from_dict(d["spec"]), owner=d.get("owner"), desired=d.get("desired", "stopped"),
                   gen=int(d.get("gen", 1)), migration=d.get("migration"), last_migration=d.get("last_migration"),
                   note=str(d.get("note", "")), history=tuple(d.get("history", ())))


class RecordCorrupt(ValueError):
    """Neither slot of a record file holds a valid record."""


def encode_slot(seq: int, obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    if len(body) > MAX_JSON:
        raise UsageError(f"the record is {len(body)} bytes of JSON; at most {MAX_JSON} fit. Shorten it "
                         "(fewer disks, shorter names).")
    head = _HEAD.pack(_MAGIC, seq, len(body), zlib.crc32(body))
    return (head + body).ljust(SLOT_SIZE, b"\0")


def _decode_one(raw: bytes) -> tuple[int, dict[str, Any]] | None:
    if len(raw) < _HEAD.size:
        return None
    magic, seq, length, crc = _HEAD.unpack_from(raw)
    body = raw[_HEAD.size:_HEAD.size + length]
    if magic != _MAGIC or length > MAX_JSON or len(body) != length or zlib.crc32(body) != crc:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return (seq, obj) if isinstance(obj, dict) else None


def decode_file(raw: bytes) -> tuple[int, dict[str, Any]]:
    """(seq, object) of the newest valid slot of a record file."""
    slots = [s for s in (_decode_one(raw[:SLOT_SIZE]), _decode_one(raw[SLOT_SIZE:2 * SLOT_SIZE])) if s]
    if not slots:
        raise RecordCorrupt("neither slot holds a valid record")
    return max(slots, key=lambda s: s[0])


def slot_offset(seq: int) -> int:
    return (seq % 2) * SLOT_SIZE
