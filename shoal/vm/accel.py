"""Which accelerator VMs run under on this host: KVM when it is proven to work, else TCG.

``/dev/kvm`` existing is not proof: nested virtualisation that accepts ``KVM_CREATE_VM``
and then never runs a guest instruction, or runs a few and then fails, is common in CI
machines and containers (here a tiny guest printed its first line under KVM, then died
on its first interrupt, and a Linux kernel printed nothing). So KVM is chosen only when
the guest the caller passes — the agent passes the Linux test guest, a real kernel with
its initramfs — booted with ``-kernel`` under ``-accel kvm`` prints ``expect`` on its
serial port within the timeout. Anything else gives TCG and one sentence saying why.

The answer is cached in a JSON file the caller names, keyed by the QEMU binary (path and
mtime) and the guest kernel's SHA-256, so the agents of one host (the lab runs several)
probe once; an exclusive ``flock`` on ``CACHE.lock`` makes the others wait for the first
one's answer instead of probing at the same time::

    {"version": 1, "entries": {"<key>": {"accel": "tcg", "reason": "...", "probed_at": 1700000000.0}}}
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from shoal.vm.errors import QemuError
from shoal.vm.qemu import QEMU_BINARY, MachineSpec, Qemu

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_SERIAL_POLL_S = 0.05
_PROBE_MEMORY_MIB = 128  # the Linux test guest needs 128 MiB


@dataclass(frozen=True)
class AccelChoice:
    """``accel`` is "kvm" or "tcg"; ``reason`` is a sentence for logs and ``shoal status``."""

    accel: str
    reason: str
    cached: bool = False


async def probe_accel(
    kernel: Path | None,
    expect: bytes,
    timeout_s: float,
    *,
    initrd: Path | None = None,
    append: str | None = None,
    cache: Path | None = None,
    binary: str = QEMU_BINARY,
    kvm_device: Path = Path("/dev/kvm"),
) -> AccelChoice:
    """KVM if ``kernel`` boots under KVM and prints ``expect`` within ``timeout_s``, else
    TCG with the reason. The answer is cached in ``cache`` (see the module docstring)."""
    if not kvm_device.exists():
        return AccelChoice("tcg", f"there is no {kvm_device} on this host (no KVM module, or no "
                                  "hardware virtualisation), so VMs run under TCG, which is slower.")
    if kernel is None or not kernel.is_file():
        return AccelChoice("tcg", f"{kvm_device} exists but there is no test guest kernel to prove "
                                  "KVM runs guests (build the test guests), so VMs run under TCG.")
    qemu_path = shutil.which(binary) or binary
    key = _cache_key(qemu_path, kernel, initrd, append)
    if cache is None:
        return await _probe(kernel, expect, timeout_s, qemu_path, initrd, append)
    async with _locked(cache, timeout_s + 30):
        hit = _read_cache(cache).get(key)
        if hit is not None:
            return AccelChoice(str(hit["accel"]), str(hit["reason"]), cached=True)
        choice = await _probe(kernel, expect, timeout_s, qemu_path, initrd, append)
        _write_cache(cache, key, choice)
        return choice


def _cache_key(qemu_path: str, kernel: Path, initrd: Path | None, append: str | None) -> str:
    try:
        mtime = os.stat(qemu_path).st_mtime_ns
    except OSError:
        mtime = 0
    h = hashlib.sha256(kernel.read_bytes())
    if initrd is not None:
        h.update(initrd.read_bytes())
    h.update((append or "").encode())
    return f"{qemu_path}:{mtime}:{h.hexdigest()}"


async def _probe(kernel: Path, expect: bytes, timeout_s: float, qemu_path: str,
                 initrd: Path | None = None, append: str | None = None) -> AccelChoice:
    work = Path(tempfile.mkdtemp(prefix="shoal-kvm-probe-"))
    serial = work / "serial.log"
    spec = MachineSpec(name=f"kvm-probe-{os.getpid()}", memory_mib=_PROBE_MEMORY_MIB,
                       kernel=str(kernel), initrd=str(initrd) if initrd else None, append=append,
                       serial_log=str(serial))
    vm = Qemu(spec, accel="kvm", qmp_socket=work / "qmp.sock", stderr_log=work / "qemu.log",
              binary=qemu_path, start_timeout_s=timeout_s, quit_timeout_s=1.0)
    started = time.monotonic()
    try:
        try:
            await vm.start()
        except QemuError as err:
            return AccelChoice("tcg", f"KVM boot failed, so VMs run under TCG: {err}")
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if expect in _read(serial):
                took = time.monotonic() - started
                return AccelChoice("kvm", f"KVM works: the test guest booted under -accel kvm and "
                                          f"answered in {took:.1f} s.")
            if vm.returncode is not None:
                return AccelChoice("tcg", f"KVM boot failed, so VMs run under TCG: QEMU exited with "
                                          f"status {vm.returncode} ({vm.stderr_tail() or 'no message'}).")
            await asyncio.sleep(_SERIAL_POLL_S)
        said = _read(serial)[-80:].decode(errors="replace").strip()
        return AccelChoice("tcg", f"KVM hung: the test guest did not print {expect.decode(errors='replace')!r} "
                                  f"within {timeout_s:g} s under -accel kvm"
                                  + (f" (its last output: {said!r})" if said else " (no output at all)")
                                  + ", so VMs run under TCG.")
    finally:
        await vm.quit()
        shutil.rmtree(work, ignore_errors=True)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


@contextlib.asynccontextmanager
async def _locked(cache: Path, wait_s: float) -> AsyncIterator[None]:
    """An exclusive flock on ``CACHE.lock``, polled so the event loop keeps running."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{cache}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise QemuError(f"another agent has held {cache}.lock for {wait_s:g} s while "
                                    "probing KVM; remove the lock file if no agent is running.") from None
                await asyncio.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _read_cache(cache: Path) -> dict[str, dict[str, object]]:
    try:
        doc = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION:
        return {}
    entries = doc.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache(cache: Path, key: str, choice: AccelChoice) -> None:
    entries = _read_cache(cache)
    entries[key] = {"accel": choice.accel, "reason": choice.reason, "probed_at": time.time()}
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1) + "\n")
    os.replace(tmp, cache)
