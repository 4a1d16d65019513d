"""The test guests' pure parts: the memory and serial-log checkers, and the build's
helpers (apt output, kernel config, module dependencies, the cpio writer)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from shoal.vm.errors import GuestError
from shoal.vm.guests import build, check, paths
from shoal.vm.guests.check import (
    HEADER_ADDR,
    HEADER_MAGIC,
    PAGE_SIZE,
    check_disk_log,
    check_memory,
    check_memory_log,
    parse_header,
)

START = 0x200000


def dump_of(values: list[int], *, base: int = START, lead: int = 0) -> tuple[bytes, int]:
    """Pages from START holding ``values`` in byte 0, preceded by ``lead`` zero bytes."""
    out = bytearray(lead + len(values) * PAGE_SIZE)
    for i, value in enumerate(values):
        out[lead + i * PAGE_SIZE] = value
    return bytes(out), base - lead


def end_of(values: list[int]) -> int:
    return START + len(values) * PAGE_SIZE


def header(
    *,
    magic: bytes = HEADER_MAGIC,
    version: int = 1,
    start: int = START,
    end: int = START + 16 * PAGE_SIZE,
    rate: int = 64,
    passes: int = 7,
) -> bytes:
    return struct.pack("<8sIIIIII", magic, version, PAGE_SIZE, start, end, rate, passes)


# --- header -------------------------------------------------------------------------


def test_header_layout_is_32_bytes_at_0x5000() -> None:
    assert check.HEADER_SIZE == 32 and HEADER_ADDR == 0x5000
    h = parse_header(header() + b"trailing bytes are ignored")
    assert (h.start, h.end, h.rate, h.passes, h.pages) == (START, START + 16 * PAGE_SIZE, 64, 7, 16)


@pytest.mark.parametrize(
    "data, words",
    [
        (header()[:20], "32 bytes"),
        (header(magic=b"\0" * 8), "no memory guest header"),
        (header(version=2), "version 2"),
        (header(start=START + 1), "inconsistent"),
        (header(end=START), "inconsistent"),
    ],
)
def test_bad_headers_raise_a_sentence(data: bytes, words: str) -> None:
    with pytest.raises(GuestError, match=words):
        parse_header(data)


# --- memory dump --------------------------------------------------------------------


def test_all_pages_equal_is_ok() -> None:
    values = [9] * 16
    dump, base = dump_of(values)
    v = check_memory(dump, base, START, end_of(values))
    assert v.ok and v.step_addr is None and v.ahead == v.behind == 9 and v.pages == 16, v
    assert "all 16 pages hold 0x09" in v.explanation


def test_one_step_down_is_ok_and_located() -> None:
    values = [10] * 5 + [9] * 11
    dump, base = dump_of(values, lead=3 * PAGE_SIZE)  # the dump may start below the range
    v = check_memory(dump, base, START, end_of(values))
    assert v.ok, v.explanation
    assert (v.step_addr, v.ahead, v.behind) == (START + 5 * PAGE_SIZE, 10, 9)


def test_check_against_a_header() -> None:
    values = [10] * 5 + [9] * 11
    dump, _ = dump_of(values)
    h = parse_header(header(end=end_of(values)))
    v = check_memory(dump, h)
    assert v.ok and v.step_addr == START + 5 * PAGE_SIZE, v.explanation
    with pytest.raises(GuestError, match="covers"):
        check_memory(dump[:-1], h)


def test_step_across_the_255_to_0_wrap_is_ok() -> None:
    values = [0x00] * 7 + [0xFF] * 9
    dump, base = dump_of(values)
    v = check_memory(dump, base, START, end_of(values))
    assert v.ok, v.explanation
    assert (v.step_addr, v.ahead, v.behind) == (START + 7 * PAGE_SIZE, 0x00, 0xFF)


def test_two_steps_fail() -> None:
    values = [10] * 4 + [9] * 4 + [10] * 8  # a page range came back from an older copy
    dump, base = dump_of(values)
    v = check_memory(dump, base, START, end_of(values))
    assert not v.ok
    assert "two steps" in v.explanation and f"0x{START + 8 * PAGE_SIZE:x}" in v.explanation, (
        v.explanation
    )


def test_two_steps_down_fail_too() -> None:
    values = [11] * 4 + [10] * 4 + [9] * 8
    dump, base = dump_of(values)
    assert not check_memory(dump, base, START, end_of(values)).ok


@pytest.mark.parametrize("ahead, behind", [(9, 10), (12, 10), (0xFF, 0x00)])
def test_a_step_that_is_not_one_down_fails(ahead: int, behind: int) -> None:
    values = [ahead] * 3 + [behind] * 13
    dump, base = dump_of(values)
    v = check_memory(dump, base, START, end_of(values))
    assert not v.ok and "step of one down" in v.explanation, v.explanation


def test_a_stray_byte_inside_a_page_fails_unless_told_otherwise() -> None:
    values = [3] * 16
    dump, base = dump_of(values)
    corrupt = bytearray(dump)
    corrupt[5 * PAGE_SIZE + 100] = 0x41
    v = check_memory(bytes(corrupt), base, START, end_of(values))
    assert not v.ok and f"0x{START + 5 * PAGE_SIZE + 100:x}" in v.explanation, v.explanation
    assert check_memory(bytes(corrupt), base, START, end_of(values), untouched_zero=False).ok


def test_bytes_outside_the_range_are_not_judged() -> None:
    values = [3] * 16
    dump, base = dump_of(values, lead=PAGE_SIZE)
    corrupt = bytearray(dump)
    corrupt[10] = 0x99  # below START
    assert check_memory(bytes(corrupt), base, START, end_of(values)).ok


@pytest.mark.parametrize(
    "base, start, end",
    [
        (START + PAGE_SIZE, START, START + 4 * PAGE_SIZE),
        (START, START, START + 99 * PAGE_SIZE),
        (START, START + 1, START + PAGE_SIZE),
    ],
)
def test_a_dump_that_does_not_cover_the_range_cannot_be_checked(
    base: int, start: int, end: int
) -> None:
    with pytest.raises(GuestError):
        check_memory(bytes(16 * PAGE_SIZE), base, start, end)


# --- memory guest serial log ----------------------------------------------------------


MEM_LOG = (
    "shoal-memguest start rate=64 range=0x00200000-0x03fe0000\r\n"
    "shoal-memguest pass=1\r\n"
    "shoal-memguest pass=2\r\n"
)


def test_memory_log_reports_boots_and_last_pass() -> None:
    v = check_memory_log(MEM_LOG)
    assert v.ok, v.explanation
    assert (v.boots, v.last_pass, v.rate, v.start, v.end) == (1, 2, 64, 0x200000, 0x3FE0000)


def test_memory_log_restart_resets_the_pass_count() -> None:
    second = "shoal-memguest start rate=0 range=0x00200000-0x03fe0000\nshoal-memguest pass=0\n"
    v = check_memory_log(MEM_LOG + second)
    assert v.ok and v.boots == 2 and v.last_pass == 0 and v.rate == 0, v.explanation


def test_memory_log_pass_going_back_fails() -> None:
    v = check_memory_log(MEM_LOG + "shoal-memguest pass=1\n")
    assert not v.ok and "went back from 2 to 1" in v.explanation


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "never started"),
        ("garbage\n", "never started"),
        (MEM_LOG + "shoal-memguest FATAL cpu exception\n", "cpu exception"),
    ],
)
def test_memory_log_failures(text: str, words: str) -> None:
    v = check_memory_log(text)
    assert not v.ok and words in v.explanation, v.explanation


# --- disk guest serial log ------------------------------------------------------------


CLEAN = "shoal-disk start blocks=256\nshoal-disk round=1 ok=256 errors=0\nshoal-disk round=2 ok=256 errors=0\n"


def test_disk_log_clean_rounds() -> None:
    v = check_disk_log("[    0.1] kernel noise\n" + CLEAN)
    assert v.ok, v.explanation
    assert (v.boots, v.rounds, v.verified, v.errors, v.last_round) == (1, 2, 512, 0, 2)


def test_disk_log_counts_errors_once() -> None:
    text = CLEAN + (
        "shoal-disk ERROR block=40 expected=r2 got=garbage\n"
        "shoal-disk ERROR block=41 expected=r2 got=torn\n"
        "shoal-disk round=3 ok=254 errors=2\n"
        "shoal-disk ERROR block=7 expected=r3 got=blank\n"  # a round cut short
    )
    v = check_disk_log(text)
    assert not v.ok and v.errors == 3 and v.rounds == 3
    assert v.error_lines[0] == "shoal-disk ERROR block=40 expected=r2 got=garbage"
    assert v.explanation.startswith("3 block(s) did not hold what the guest last wrote"), (
        v.explanation
    )


def test_disk_log_errors_beyond_the_printed_lines_count() -> None:
    v = check_disk_log(
        CLEAN
        + "shoal-disk ERROR block=1 expected=r2 got=blank\nshoal-disk round=3 ok=0 errors=256\n"
    )
    assert v.errors == 256


def test_disk_log_resume_after_restart_is_fine() -> None:
    text = (
        CLEAN
        + "shoal-disk round=3 ok=256 errors=0\nshoal-disk start blocks=256\n"
        + (
            "shoal-disk resume round=4 block=100 ok=100 errors=0\nshoal-disk round=4 ok=156 errors=0\n"
        )
    )
    v = check_disk_log(text)
    assert v.ok, v.explanation
    assert (v.boots, v.rounds, v.verified, v.last_round) == (2, 4, 512 + 256 + 100 + 156, 4)


def test_disk_log_resume_behind_the_last_round_fails() -> None:
    text = (
        CLEAN + "shoal-disk start blocks=256\nshoal-disk resume round=2 block=10 ok=10 errors=0\n"
    )
    v = check_disk_log(text)
    assert not v.ok and "round 1 complete though round 2 had completed" in v.explanation, (
        v.explanation
    )


def test_disk_log_full_round_resume_is_not_behind() -> None:
    text = (
        CLEAN + "shoal-disk start blocks=256\nshoal-disk resume round=2 block=256 ok=0 errors=0\n"
    )
    assert check_disk_log(text).ok


def test_disk_log_fresh_disk_after_rounds_fails() -> None:
    v = check_disk_log(CLEAN + "shoal-disk start blocks=256\nshoal-disk round=1 ok=256 errors=0\n")
    assert not v.ok and "no stamps" in v.explanation, v.explanation


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "never started"),
        (CLEAN + "shoal-disk FATAL no virtio disk appeared\n", "no virtio disk"),
    ],
)
def test_disk_log_failures(text: str, words: str) -> None:
    v = check_disk_log(text)
    assert not v.ok and words in v.explanation, v.explanation


# --- locating guests ------------------------------------------------------------------


def test_locate_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.GUESTS_DIR_ENV, str(tmp_path))
    assert paths.guests_dir() == tmp_path
    with pytest.raises(
        GuestError, match=r"not built; run './run setup' or 'python -m shoal.vm.guests build'"
    ):
        paths.locate("memory")
    for name in (paths.MANIFEST, paths.MEMORY_KERNEL):
        (tmp_path / name).write_text("x")
    image = paths.locate("memory")
    assert image.kernel == tmp_path / paths.MEMORY_KERNEL and image.initrd is None
    with pytest.raises(GuestError, match="not built"):
        paths.locate("disk")
    with pytest.raises(GuestError, match="no test guest called 'cdrom'"):
        paths.locate("cdrom")


def test_guests_dir_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(paths.GUESTS_DIR_ENV, raising=False)
    assert paths.guests_dir() == Path("/var/cache/shoal/guests")


# --- build helpers --------------------------------------------------------------------


def test_kernel_package_from_apt_cache_depends() -> None:
    text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert build.kernel_package_from_depends(text) == "linux-image-6.1.0-56-cloud-amd64"
    assert build.kernel_package_from_depends("E: No packages found\n") is None


def test_kernel_config_parsing() -> None:
    config = build.parse_kernel_config(
        'CONFIG_VIRTIO_BLK=m\n# CONFIG_X is not set\nCONFIG_DEVTMPFS=y\nCONFIG_S="a b"\n'
    )
    assert config == {"CONFIG_VIRTIO_BLK": "m", "CONFIG_DEVTMPFS": "y", "CONFIG_S": "a b"}


def test_module_depends_from_modinfo() -> None:
    ko = b"\x7fELF...\0license=GPL\0depends=virtio,virtio-ring\0retpoline=Y\0"
    assert build.module_depends(ko) == ["virtio", "virtio_ring"]
    assert build.module_depends(b"\0depends=\0name=virtio_ring\0") == []


def test_load_order_puts_dependencies_first() -> None:
    depends = {
        "virtio_blk": ["virtio", "virtio_ring"],
        "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev", "virtio"],
        "virtio": ["virtio_ring"],
        "virtio_ring": [],
        "virtio_pci_modern_dev": [],
    }
    order = build.load_order(["virtio_pci", "virtio_blk"], depends)
    assert sorted(order) == sorted(depends)
    for module, deps in depends.items():
        assert all(order.index(d) < order.index(module) for d in deps)
    with pytest.raises(GuestError, match="cycle"):
        build.load_order(["a"], {"a": ["b"], "b": ["a"]})


def test_static_elf_detection() -> None:
    ehdr = bytearray(64)
    ehdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", ehdr, 0x20, 64)
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)
    load = struct.pack("<I", 1) + bytes(52)
    interp = struct.pack("<I", 3) + bytes(52)
    assert build.is_static_elf(bytes(ehdr) + load)
    assert not build.is_static_elf(bytes(ehdr) + interp)
    assert not build.is_static_elf(b"#!/bin/sh\n")
    assert not build.is_static_elf(Path(sys.executable).resolve().read_bytes()[:4096])


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    out: list[tuple[str, int, bytes, tuple[int, int]]] = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701" and pos % 4 == 0
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out.append((name, fields[1], body, (fields[9], fields[10])))


def test_newc_archive_round_trips() -> None:
    entries = build.initramfs_entries(
        b"#!/bin/busybox sh\n", b"BB" * 1001, [("virtio", b"ko1"), ("virtio_blk", b"ko22")]
    )
    parsed = {
        name: (mode, body, rdev)
        for name, mode, body, rdev in parse_newc(build.newc_archive(entries))
    }
    assert parsed["init"] == (0o100755, b"#!/bin/busybox sh\n", (0, 0))
    assert parsed["bin/busybox"][1] == b"BB" * 1001
    assert parsed["bin/sh"] == (0o120777, b"busybox", (0, 0))
    assert parsed["dev/console"] == (0o020600, b"", (5, 1))
    assert parsed["etc/shoal-modules"][1] == b"virtio\nvirtio_blk\n"
    assert parsed["lib/modules/virtio_blk.ko"][1] == b"ko22"
    assert parsed["proc"][0] == 0o040755
    # The same inputs give the same bytes (the manifest's hashes stay stable).
    assert build.newc_archive(entries) == build.newc_archive(list(entries))
