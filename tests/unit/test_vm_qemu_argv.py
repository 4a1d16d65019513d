"""The QEMU command line built from a machine spec (pure; no QEMU runs)."""

from __future__ import annotations

import pytest

from shoal.vm.errors import SpecError
from shoal.vm.qemu import DiskAttach, MachineSpec, build_argv


def pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def spec(**kw: object) -> MachineSpec:
    base: dict[str, object] = {"name": "web1", "memory_mib": 256, "cpus": 2}
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def test_minimal_machine() -> None:
    argv = build_argv(spec(), accel="tcg", qmp_socket="/run/shoal/web1.qmp", incoming=None, start_paused=False)
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert pairs(argv, "-display") == ["none"]
    assert pairs(argv, "-name") == ["web1,process=shoal-vm-web1"]
    assert pairs(argv, "-machine") == ["pc-i440fx-7.2"]
    assert pairs(argv, "-accel") == ["tcg"]
    assert pairs(argv, "-cpu") == ["qemu64"]
    assert pairs(argv, "-smp") == ["2"]
    assert pairs(argv, "-m") == ["256"]
    assert pairs(argv, "-chardev") == ["socket,id=qmp,path=/run/shoal/web1.qmp,server=on,wait=off"]
    assert pairs(argv, "-mon") == ["chardev=qmp,mode=control"]
    for absent in ("-incoming", "-S", "-serial", "-kernel", "-blockdev", "-device"):
        assert absent not in argv


def test_incoming_paused_with_disks_kernel_and_serial() -> None:
    s = spec(
        disks=(DiskAttach("/run/shoal/nbd.sock", "vol1/web1.img", "disk0"),
               DiskAttach("/run/shoal/nbd.sock", "vol1/data.img", "data")),
        kernel="/k/bzImage", initrd="/k/initrd", append="console=ttyS0 quiet",
        serial_log="/var/log/shoal/web1.log", cpu_model="Westmere", extra_args=("-rtc", "base=utc"),
    )
    argv = build_argv(s, accel="kvm", qmp_socket="/q", incoming="defer", start_paused=True,
                      binary="/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert pairs(argv, "-accel") == ["kvm"]
    assert pairs(argv, "-cpu") == ["Westmere"]
    assert pairs(argv, "-blockdev") == [
        "driver=nbd,node-name=disk0,server.type=unix,server.path=/run/shoal/nbd.sock,export=vol1/web1.img",
        "driver=nbd,node-name=data,server.type=unix,server.path=/run/shoal/nbd.sock,export=vol1/data.img",
    ]
    assert pairs(argv, "-device") == [
        "virtio-blk-pci,drive=disk0,id=disk0-dev,serial=disk0",
        "virtio-blk-pci,drive=data,id=data-dev,serial=data",
    ]
    assert pairs(argv, "-chardev")[1] == "file,id=serial0,path=/var/log/shoal/web1.log,append=on"
    assert pairs(argv, "-serial") == ["chardev:serial0"]
    assert pairs(argv, "-kernel") == ["/k/bzImage"]
    assert pairs(argv, "-initrd") == ["/k/initrd"]
    assert pairs(argv, "-append") == ["console=ttyS0 quiet"]
    assert pairs(argv, "-incoming") == ["defer"]
    assert "-S" in argv
    assert argv[-2:] == ["-rtc", "base=utc"]


def test_commas_in_paths_are_doubled() -> None:
    s = spec(serial_log="/tmp/a,b.log", disks=(DiskAttach("/tmp/x,y.sock", "e,f", "d0"),))
    argv = build_argv(s, accel="tcg", qmp_socket="/tmp/q,1.sock", incoming=None, start_paused=False)
    assert "socket,id=qmp,path=/tmp/q,,1.sock,server=on,wait=off" in argv
    assert "file,id=serial0,path=/tmp/a,,b.log,append=on" in argv
    assert "driver=nbd,node-name=d0,server.type=unix,server.path=/tmp/x,,y.sock,export=e,,f" in argv


def test_same_spec_same_machine_on_both_ends() -> None:
    """Source and destination differ only by -incoming/-S and their local paths."""
    s = spec(kernel="/k", serial_log="/log")
    src = build_argv(s, accel="tcg", qmp_socket="/q", incoming=None, start_paused=False)
    dst = build_argv(s, accel="tcg", qmp_socket="/q", incoming="defer", start_paused=True)
    assert [a for a in dst if a not in ("-incoming", "defer", "-S")] == src


@pytest.mark.parametrize("kw, words", [
    ({"name": "has space"}, "VM name 'has space' is not usable"),
    ({"name": "a,b"}, "VM name 'a,b' is not usable"),
    ({"memory_mib": 0}, "memory_mib must be a positive number of MiB"),
    ({"cpus": 0}, "cpus must be 1-255"),
    ({"append": "quiet"}, "initrd and append need a kernel"),
    ({"disks": (DiskAttach("/s", "e", "d0"), DiskAttach("/s", "f", "d0"))}, "two disks share a node name"),
])
def test_bad_specs_are_sentences(kw: dict[str, object], words: str) -> None:
    with pytest.raises(SpecError, match=words):
        spec(**kw)


def test_bad_disks_and_paths() -> None:
    with pytest.raises(SpecError, match="must start with a letter"):
        DiskAttach("/s", "e", "0disk")
    with pytest.raises(SpecError, match="at most 20 characters"):
        DiskAttach("/s", "e", "d" * 21)
    with pytest.raises(SpecError, match="longer than 107 bytes"):
        DiskAttach("/" + "x" * 120, "e", "d0")
    with pytest.raises(SpecError, match="QMP socket path"):
        build_argv(spec(), accel="tcg", qmp_socket="/" + "q" * 120, incoming=None, start_paused=False)
    with pytest.raises(SpecError, match="accelerator 'hvf' is not one of kvm, tcg"):
        build_argv(spec(), accel="hvf", qmp_socket="/q", incoming=None, start_paused=False)
