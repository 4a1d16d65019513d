"""A QEMU VM boots from a disk served by our NBD server.

The disk is a hand-assembled 512-byte MBR boot sector (16-bit real mode) that
prints a line on the first serial port (I/O port 0x3f8) and halts::

    0000  31 C0        xor  ax, ax
    0002  8E D8        mov  ds, ax
    0004  BA F8 03     mov  dx, 0x3f8
    0007  BE 17 7C     mov  si, 0x7c17        ; the message, loaded at 0x7c00 + 0x17
    000A  FC           cld
    000B  AC           lodsb                  ; loop:
    000C  84 C0        test al, al
    000E  74 03        jz   done
    0010  EE           out  dx, al
    0011  EB F8        jmp  loop
    0013  FA           cli                    ; done:
    0014  F4           hlt
    0015  EB FD        jmp  $-1 (hlt)
    0017  "SHOAL NBD BOOT OK <nonce>\\r\\n\\0"
    01FE  55 AA        boot signature

The nonce changes every run, so the line can only come from this disk.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time

import pytest

from shoal.nbd.backend import FileBackend
from tests.integration.nbd_helpers import require, serving, short_dir

pytestmark = pytest.mark.qemu

CODE = bytes.fromhex("31C0 8ED8 BAF803 BE177C FC AC 84C0 7403 EE EBF8 FA F4 EBFD".replace(" ", ""))


def boot_sector(message: bytes) -> bytes:
    assert len(CODE) == 0x17
    sector = bytearray(512)
    body = CODE + message + b"\r\n\0"
    sector[: len(body)] = body
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def test_vm_boots_from_our_export() -> None:
    qemu = require("qemu-system-x86_64")
    nonce = secrets.token_hex(4).encode()
    line = b"SHOAL NBD BOOT OK " + nonce
    with short_dir() as work:
        image = os.path.join(work, "boot.raw")
        with open(image, "wb") as f:
            f.write(boot_sector(line))
            f.truncate(1 << 20)
        serial = os.path.join(work, "serial.log")
        backend = FileBackend(image)
        with serving({"boot": backend}, os.path.join(work, "s")) as srv:
            vm = subprocess.Popen(
                [
                    qemu, "-accel", "tcg", "-machine", "pc", "-m", "32", "-nodefaults", "-display", "none",
                    "-no-reboot", "-serial", f"file:{serial}",
                    "-drive", f"file={srv.uri('boot')},format=raw,if=ide,cache=none",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 90
                out = b""
                while time.monotonic() < deadline:
                    if os.path.exists(serial):
                        with open(serial, "rb") as f:
                            out = f.read()
                        if line in out:
                            break
                    if vm.poll() is not None:
                        break
                    time.sleep(0.2)
                assert line in out, (
                    f"no boot line on the serial port; got {out!r}, qemu said {vm.stdout.read() if vm.poll() is not None and vm.stdout else b''!r}"
                )
            finally:
                vm.kill()
                vm.wait(10)
        backend.close()
