"""The two test guests booted with plain QEMU (TCG, no lab, no shoal QEMU driver): the
memory guest dirties its range at the rate asked and a paused dump passes the checker;
the disk guest's rounds verify, and corruption made on the host is reported by the guest.

A minimal QMP client lives here so these tests depend only on QEMU and the guests."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.vm.errors import GuestError
from shoal.vm.guests.build import build_guests
from shoal.vm.guests.check import (
    HEADER_ADDR,
    HEADER_SIZE,
    MemoryHeader,
    check_disk_log,
    check_memory,
    check_memory_log,
    parse_header,
)
from shoal.vm.guests.paths import GuestImage, guests_dir, locate
from tests.conftest import require_tool

pytestmark = pytest.mark.qemu

BLOCK = 4096


@pytest.fixture(scope="module")
def images() -> dict[str, GuestImage]:
    """The built guests; built here if they are not (that needs apt to reach Debian)."""
    try:
        return {kind: locate(kind) for kind in ("memory", "disk")}
    except GuestError:
        pass
    try:
        build_guests(guests_dir())
        return {kind: locate(kind) for kind in ("memory", "disk")}
    except GuestError as err:
        pytest.fail(f"the test guests are not built and building them failed: {err}")


@pytest.fixture
def work() -> Iterator[Path]:
    """A short directory: unix socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="shoal-guest-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class QMP:
    """Just enough QMP: greeting, capabilities, commands; events are skipped."""

    def __init__(self, path: Path, deadline_s: float = 10) -> None:
        until = time.monotonic() + deadline_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > until:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(30)
        self.reader = self.sock.makefile("rb")
        assert "QMP" in self._read()
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("QEMU closed the QMP socket")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise AssertionError(f"QMP {command} failed: {reply['error']}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class Guest:
    """One QEMU process running a test guest, its serial log in a file."""

    def __init__(
        self, work: Path, name: str, image: GuestImage, append: str, *, disk: Path | None = None
    ) -> None:
        qemu = require_tool("qemu-system-x86_64", "qemu-system-x86")
        self.serial = work / f"{name}.log"
        self.serial.unlink(missing_ok=True)
        qmp_path = work / f"{name}.qmp"
        cmd = [
            qemu,
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-m",
            str(image.memory_mib),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-kernel",
            str(image.kernel),
            "-append",
            append,
            "-serial",
            f"file:{self.serial}",
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
        ]
        if image.initrd:
            cmd += ["-initrd", str(image.initrd)]
        if disk:
            cmd += ["-drive", f"file={disk},format=raw,if=virtio"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            self.qmp = QMP(qmp_path)
        except OSError:
            self.kill()
            raise AssertionError(
                f"QEMU did not start: {self.proc.communicate()[0].decode(errors='replace')}"
            ) from None

    def log(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout_s: float, *, count: int = 1) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in the serial log, waiting for them."""
        until = time.monotonic() + timeout_s
        while True:
            found = list(re.finditer(pattern, self.log()))
            if len(found) >= count:
                return found
            if self.proc.poll() is not None or time.monotonic() > until:
                raise AssertionError(
                    f"no {count} x {pattern!r} on the serial port within {timeout_s} s; it says:\n{self.log()[-2000:]}"
                )
            time.sleep(0.1)

    def header(self, work: Path) -> MemoryHeader:
        path = work / "header.bin"
        self.qmp.execute("pmemsave", val=HEADER_ADDR, size=HEADER_SIZE, filename=str(path))
        return parse_header(path.read_bytes())

    def kill(self) -> None:
        """SIGKILL: no shutdown, as if the host died."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.qmp.close()
        if self.proc.stdout:
            self.proc.stdout.close()

    def quit(self) -> None:
        try:
            self.qmp.execute("quit")
            self.proc.wait(timeout=10)
        except (OSError, ConnectionError, subprocess.TimeoutExpired):
            pass
        self.kill()


def dirty_rate_mib_s(guest: Guest, work: Path, window_s: float) -> float:
    """MiB/s dirtied, timed from one pass boundary to another at least ``window_s`` later
    (the header's pass count, polled every 20 ms)."""

    def next_boundary(after: int) -> tuple[int, float]:
        until = time.monotonic() + 10
        while time.monotonic() < until:
            passes = guest.header(work).passes
            if passes != after:
                return passes, time.monotonic()
            time.sleep(0.02)
        raise AssertionError(f"the memory guest stayed at pass {after} for 10 s")

    header = guest.header(work)
    first, t0 = next_boundary(header.passes)
    time.sleep(window_s)
    last, t1 = next_boundary(guest.header(work).passes)
    return (last - first) * (header.end - header.start) / (1 << 20) / (t1 - t0)


# --- memory guest --------------------------------------------------------------------


def test_memory_guest_dump_passes_the_checker_and_corruption_fails(
    images: dict[str, GuestImage], work: Path
) -> None:
    guest = Guest(work, "mem", images["memory"], "rate=0")
    try:
        start = guest.wait_for(
            r"shoal-memguest start rate=0 range=0x([0-9a-f]{8})-0x([0-9a-f]{8})\n", 20
        )[0]
        booted_s = time.monotonic() - guest.started
        guest.wait_for(r"shoal-memguest pass=\d+\n", 5)
        header = guest.header(work)
        assert (header.start, header.end, header.rate) == (int(start[1], 16), int(start[2], 16), 0)
        assert header.start == 0x200000 < header.end <= images["memory"].memory_mib << 20

        guest.qmp.execute("stop")
        header = guest.header(work)
        dump_path = work / "range.bin"
        guest.qmp.execute(
            "pmemsave", val=header.start, size=header.end - header.start, filename=str(dump_path)
        )
        dump = dump_path.read_bytes()
        verdict = check_memory(dump, header.start, header.start, header.end)
        assert verdict.ok, verdict.explanation
        # RAM starts zeroed: after P passes the pages hold P, the ones before the step
        # P+1 (and all P+1 if the pause fell between the last page and the count).
        assert verdict.behind in {header.passes % 256, (header.passes + 1) % 256}, (verdict, header)

        # A page that went back in time (an older copy) makes a second step.
        bad = bytearray(dump)
        victim = (
            10
            if verdict.step_addr is None or verdict.step_addr - header.start > 20 * BLOCK
            else header.pages - 10
        )
        bad[victim * BLOCK] = (bad[victim * BLOCK] - 1) % 256
        broken = check_memory(bytes(bad), header)
        assert not broken.ok and "step" in broken.explanation, broken.explanation
        stray = bytearray(dump)
        stray[5 * BLOCK + 77] = 1
        assert not check_memory(bytes(stray), header).ok

        guest.qmp.execute("cont")
        guest.wait_for(r"shoal-memguest pass=\d+\n", 5, count=2)
        log = check_memory_log(guest.log())
        assert (
            log.ok
            and log.boots == 1
            and log.rate == 0
            and (log.start, log.end) == (header.start, header.end)
        ), log
        print(f"memory guest: start line {booted_s:.2f} s after QEMU started")
    finally:
        guest.quit()


def test_memory_guest_rate_limits_dirtying(images: dict[str, GuestImage], work: Path) -> None:
    rates = {}
    for rate in (64, 0):
        guest = Guest(
            work, f"mem{rate}", images["memory"], f"rate=99 rate={rate}"
        )  # the last rate= wins
        try:
            guest.wait_for(rf"shoal-memguest start rate={rate} ", 20)
            rates[rate] = dirty_rate_mib_s(guest, work, 1.5)
        finally:
            guest.quit()
    print(f"memory guest dirty rates (MiB/s): rate=64 -> {rates[64]:.0f}, rate=0 -> {rates[0]:.0f}")
    assert 40 <= rates[64] <= 80, rates
    assert rates[0] > 4 * rates[64], rates


# --- disk guest ----------------------------------------------------------------------


def stamp_round(disk: Path, block: int) -> int:
    with disk.open("rb") as f:
        f.seek(block * BLOCK)
        m = re.match(rb"shoal-disk round=(\d+) block=(\d+) off=0000", f.read(64))
    assert m and int(m[2]) == block, f"block {block} holds no stamp"
    return int(m[1])


def scribble(disk: Path, block: int) -> None:
    with disk.open("r+b") as f:
        f.seek(block * BLOCK + 1000)
        f.write(b"SCRIBBLED BY THE HOST")
        f.flush()
        os.fsync(f.fileno())


def new_disk(work: Path) -> Path:
    disk = work / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(2 << 20)
    return disk


def test_disk_guest_rounds_verify_and_host_corruption_is_reported(
    images: dict[str, GuestImage], work: Path
) -> None:
    disk = new_disk(work)
    guest = Guest(work, "disk", images["disk"], images["disk"].append, disk=disk)
    try:
        guest.wait_for(r"shoal-disk start blocks=256", 30)
        booted_s = time.monotonic() - guest.started
        guest.wait_for(r"shoal-disk round=\d+ ok=\d+ errors=\d+", 30, count=2)
        rounds_s = time.monotonic() - guest.started - booted_s
        verdict = check_disk_log(guest.log())
        assert verdict.ok and verdict.rounds >= 2 and verdict.errors == 0, verdict.explanation
        assert verdict.verified >= 2 * 256

        # Two blocks in different 32-block chunks: at most one chunk is between its read
        # and its write when the VM stops, so at least one scribble is read back.
        guest.qmp.execute("stop")
        scribble(disk, 40)
        scribble(disk, 200)
        guest.qmp.execute("cont")
        errors = guest.wait_for(r"shoal-disk ERROR block=(\d+) expected=r\d+ got=garbage", 20)
        assert errors[0][1] in {"40", "200"}
        verdict = check_disk_log(guest.log())
        assert (
            not verdict.ok
            and verdict.errors >= 1
            and "did not hold what the guest last wrote" in verdict.explanation
        )
        print(
            f"disk guest: start line {booted_s:.1f} s after QEMU started, 2 rounds of 256 blocks in {rounds_s:.1f} s"
        )
    finally:
        guest.quit()


def test_disk_guest_resumes_after_a_kill_and_catches_changes_between_boots(
    images: dict[str, GuestImage], work: Path
) -> None:
    disk = new_disk(work)
    first = Guest(work, "boot1", images["disk"], images["disk"].append, disk=disk)
    try:
        first.wait_for(r"shoal-disk round=1 ", 40)
        time.sleep(0.7)  # into round 2, most likely mid-way
    finally:
        first.kill()
    log1 = first.log()
    assert check_disk_log(log1).ok, log1

    second = Guest(work, "boot2", images["disk"], images["disk"].append, disk=disk)
    try:
        resume = second.wait_for(r"shoal-disk resume round=(\d+) block=(\d+) ok=\d+ errors=0", 30)[
            0
        ]
        second.wait_for(r"shoal-disk round=\d+ ", 30)
    finally:
        second.kill()
    log2 = second.log()
    both = check_disk_log(log1 + log2)
    assert both.ok and both.boots == 2, both.explanation
    assert int(resume[1]) >= 1, resume[0]

    # Between boots, damage a block the guest wrote: boot 3 must notice, whether its
    # scan or its next round reads the block first.
    victim = 1
    assert stamp_round(disk, victim) >= 1
    scribble(disk, victim)
    third = Guest(work, "boot3", images["disk"], images["disk"].append, disk=disk)
    try:
        error = third.wait_for(r"shoal-disk ERROR block=(\d+) expected=\S+ got=(\S+)", 30)[0]
        assert (error[1], error[2]) == (str(victim), "garbage"), error[0]
    finally:
        third.kill()
    verdict = check_disk_log(log1 + log2 + third.log())
    assert not verdict.ok and verdict.boots == 3, verdict.explanation
