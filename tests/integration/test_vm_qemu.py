"""The QEMU driver against real QEMU (TCG): start, QMP, events, stop, kill, no leaks;
and the KVM probe. The guest is a multiboot image of a few bytes built here: it prints a
line on the serial port, then halts or keeps dirtying memory."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shoal.vm.accel import probe_accel
from shoal.vm.errors import QemuCommandError, QemuError, QemuExited
from shoal.vm.qemu import MachineSpec, Qemu, find_vm_processes
from tests.integration.nbd_helpers import require

pytestmark = pytest.mark.qemu

T = TypeVar("T")

#: where the multiboot loader puts the image (the a.out kludge in its header says so)
LOAD_ADDR = 0x100000
#: where the dirtying guest starts writing
DIRTY_BASE = 0x200000


def multiboot_guest(message: bytes, *, dirty_mib: int = 0) -> bytes:
    """A flat multiboot image: print ``message`` on COM1, then ``hlt`` forever, or (with
    ``dirty_mib``) write one word into each page of ``dirty_mib`` MiB from 2 MiB on, over
    and over, so every page is dirty again a few microseconds after QEMU sent it."""
    header_len = 32
    code = bytearray(b"\xBE\0\0\0\0")            # mov esi, message
    loop = len(code)
    code += b"\xAC\x84\xC0"                       # lodsb; test al, al
    code += b"\x74\x00"                           # jz done
    jz = len(code) - 1
    code += b"\x66\xBA\xF8\x03\xEE"               # mov dx, 0x3f8; out dx, al
    code += b"\xEB" + bytes([(loop - len(code) - 2) & 0xFF])  # jmp loop
    code[jz] = len(code) - jz - 1
    if not dirty_mib:
        code += b"\xF4\xEB\xFD"                   # hlt; jmp hlt (interrupts are off)
    else:
        top = len(code)
        code += b"\xBF" + struct.pack("<I", DIRTY_BASE)      # mov edi, DIRTY_BASE
        code += b"\x40"                                       # inc eax
        inner = len(code)
        code += b"\x89\x07"                                   # mov [edi], eax
        code += b"\x81\xC7\x00\x10\x00\x00"                   # add edi, 4096
        code += b"\x81\xFF" + struct.pack("<I", DIRTY_BASE + (dirty_mib << 20))  # cmp edi, end
        code += b"\x72" + bytes([(inner - len(code) - 2) & 0xFF])  # jb inner
        code += b"\xEB" + bytes([(top - len(code) - 2) & 0xFF])    # jmp top
    code[1:5] = struct.pack("<I", LOAD_ADDR + header_len + len(code))
    code += message + b"\0"
    magic, flags = 0x1BADB002, 0x00010000  # flags: the load addresses below are valid
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF,
                         LOAD_ADDR, LOAD_ADDR, 0, 0, LOAD_ADDR + header_len)
    return header + bytes(code)


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@pytest.fixture
def work() -> Iterator[Path]:
    """A short directory: unix socket paths must stay under 108 bytes."""
    require("qemu-system-x86_64")
    d = Path(tempfile.mkdtemp(prefix="shoal-vm-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def guest_kernel(work: Path, message: bytes = b"READY\n", *, dirty_mib: int = 0) -> str:
    path = work / ("dirty.bin" if dirty_mib else "idle.bin")
    path.write_bytes(multiboot_guest(message, dirty_mib=dirty_mib))
    return str(path)


def make_qemu(work: Path, name: str, *, kernel: str | None = None, memory_mib: int = 32,
              incoming: str | bool | None = None, start_paused: bool = False,
              extra: tuple[str, ...] = (), **kw: Any) -> Qemu:
    spec = MachineSpec(name=name, memory_mib=memory_mib, kernel=kernel,
                       serial_log=str(work / f"{name}.serial"), extra_args=extra)
    return Qemu(spec, accel="tcg", qmp_socket=work / f"{name}.qmp", stderr_log=work / f"{name}.log",
                incoming=incoming, start_paused=start_paused, die_with_parent=True, **kw)


async def wait_serial(work: Path, name: str, text: bytes, timeout_s: float = 10) -> None:
    path = work / f"{name}.serial"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_bytes():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} did not print {text!r} within {timeout_s} s")


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 100000}"


def assert_no_qemu(name: str) -> None:
    assert find_vm_processes(name) == {}, f"QEMU for {name} is still running"


def test_start_status_events_quit(work: Path) -> None:
    name = unique("life")

    async def scenario() -> None:
        async with make_qemu(work, name, kernel=guest_kernel(work)) as vm:
            assert vm.pid in find_vm_processes(name)
            await wait_serial(work, name, b"READY")
            assert await vm.status() == "running"
            mark = vm.event_mark()
            before = time.monotonic()
            await vm.stop()
            await asyncio.sleep(0.2)  # the event has arrived by now: since= must still find it
            stop = await vm.wait_event("STOP", since=mark, timeout_s=5)
            assert before <= stop.received_at <= time.monotonic()
            assert await vm.status() == "paused"
            with vm.subscribe("RESUME") as sub:
                await vm.cont()
                assert (await asyncio.wait_for(sub.get(), 5)).name == "RESUME"
            with vm.subscribe() as everything:
                assert await vm.quit() == 0
                names = [e.name async for e in everything]
            assert "SHUTDOWN" in names
            with pytest.raises(QemuExited, match="exited with status 0"):
                await vm.status()

    run(scenario())
    assert_no_qemu(name)


def test_refused_command_and_pmemsave(work: Path) -> None:
    name = unique("qmp")

    async def scenario() -> None:
        async with make_qemu(work, name, kernel=guest_kernel(work, b"MEMORY-MARK\n")) as vm:
            with pytest.raises(QemuCommandError) as info:
                await vm.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            await wait_serial(work, name, b"MEMORY-MARK")
            await vm.pmemsave(LOAD_ADDR, 4096, work / "mem.bin")
            assert b"MEMORY-MARK" in (work / "mem.bin").read_bytes()

    run(scenario())
    assert_no_qemu(name)


def test_kill_reaps_and_ends_subscriptions(work: Path) -> None:
    name = unique("kill")

    async def scenario() -> None:
        vm = make_qemu(work, name)  # no kernel: SeaBIOS finds nothing to boot and idles
        await vm.start()
        with vm.subscribe("STOP") as sub:
            vm.kill()
            assert await vm.wait_exit() == -9
            with pytest.raises(QemuExited, match="killed by signal 9"):
                await sub.get()
        with pytest.raises(QemuExited):
            await vm.execute("query-status")
        assert await vm.quit() == -9  # quitting a dead QEMU is harmless

    run(scenario())
    assert_no_qemu(name)


def test_start_failure_says_why_and_leaves_nothing(work: Path) -> None:
    name = unique("bad")

    async def scenario() -> None:
        vm = make_qemu(work, name, extra=("-device", "no-such-device"))
        with pytest.raises(QemuExited, match="no-such-device") as info:
            await vm.start()
        assert info.value.returncode == 1

    run(scenario())
    assert_no_qemu(name)


def test_start_timeout_and_cancel_kill_the_process(work: Path) -> None:
    """A QEMU that never opens its QMP socket is killed after start_timeout_s, and so is
    one whose start() is cancelled."""
    fake = work / "fake-qemu"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)

    async def scenario() -> None:
        vm = make_qemu(work, "slow", binary=str(fake), start_timeout_s=0.5)
        with pytest.raises(QemuError, match="did not answer on its QMP socket"):
            await vm.start()
        assert vm.returncode == -9
        vm2 = make_qemu(work, "cancelled", binary=str(fake))
        task = asyncio.create_task(vm2.start())
        while vm2.pid is None:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert vm2.returncode == -9
        for pid in (vm.pid, vm2.pid):
            assert pid is not None and not Path(f"/proc/{pid}").exists()

    run(scenario())


def test_probe_accel_answers_and_caches(work: Path) -> None:
    """Whatever this host's KVM does, the probe answers with a sentence, caches it, and
    the second agent gets the cached answer without booting anything."""
    kernel = Path(guest_kernel(work, b"probe-ok\n"))
    cache = work / "accel.json"

    async def scenario() -> None:
        first = await probe_accel(kernel, b"probe-ok", 3.0, cache=cache)
        assert first.accel in ("kvm", "tcg") and not first.cached
        assert first.reason.endswith(".")
        t0 = time.monotonic()
        second = await probe_accel(kernel, b"probe-ok", 3.0, cache=cache)
        assert (second.accel, second.reason, second.cached) == (first.accel, first.reason, True)
        assert time.monotonic() - t0 < 1.0
        no_kvm = await probe_accel(kernel, b"probe-ok", 3.0, kvm_device=work / "no-kvm")
        assert no_kvm.accel == "tcg" and "no-kvm" in no_kvm.reason
        no_guest = await probe_accel(None, b"probe-ok", 3.0, kvm_device=Path("/dev/null"))
        assert no_guest.accel == "tcg" and "no test guest" in no_guest.reason

    run(scenario())
    assert_no_qemu(f"kvm-probe-{os.getpid()}")
