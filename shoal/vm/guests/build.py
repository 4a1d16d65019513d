"""Build the test guests into the guests directory (see paths.py and docs/GUESTS.md).

memory  memguest.S -> memguest.elf with GNU as and ld (binutils).
disk    Debian's cloud kernel, fetched with ``apt-get download`` and unpacked with
        ``dpkg-deb -x`` (never installed on the host), plus an initramfs written here:
        a gzip'd newc cpio with busybox-static, diskguest-init.sh as /init and the
        virtio modules the kernel does not have built in.

A guest is up to date when manifest.json records the same recipe and inputs and every
output still has the sha256 the manifest says: then the build does nothing. The disk
guest keeps the kernel it was built with until ``--force`` (a newer kernel in apt is
not a reason to download 27 MB). Outputs are written to temporary names and renamed;
the manifest is written last; one build at a time per directory (flock).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.vm.errors import GuestError
from shoal.vm.guests.paths import DISK_INITRD, DISK_KERNEL, MANIFEST, MEMORY_KERNEL

HERE = Path(__file__).resolve().parent
MEMORY_SOURCE = HERE / "memguest.S"
DISK_INIT = HERE / "diskguest-init.sh"
BUSYBOX = Path("/bin/busybox")

# A multiboot ELF32 loaded at 1 MiB; -N keeps it one small segment.
LD_FLAGS = ("-m", "elf_i386", "-N", "-Ttext=0x100000", "-e", "_start", "--build-id=none")

# Bump when a recipe changes so existing builds are redone.
MEMORY_RECIPE = 1
DISK_RECIPE = 1

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# Drivers the disk guest needs and the config symbol that says how the kernel has them.
DRIVERS = {"virtio_pci": "CONFIG_VIRTIO_PCI", "virtio_blk": "CONFIG_VIRTIO_BLK"}
# Features the init script needs built in.
REQUIRED_BUILTIN = (
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_RD_GZIP",
    "CONFIG_DEVTMPFS",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_PROC_FS",
    "CONFIG_SYSFS",
)

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def build_guests(directory: Path, *, force: bool = False, progress: Progress = _quiet) -> list[str]:
    """Build whatever is missing or stale; a sentence per guest built (none: all up to
    date)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GuestError(
            f"cannot create the guests directory {directory} ({err.strerror}); "
            "run as root or point SHOAL_GUESTS_DIR somewhere writable"
        ) from err
    with _locked(directory):
        # Left by a build that was killed.
        for stale in [*directory.glob(".build-*"), *directory.glob("debs/.download-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        manifest = _load_manifest(directory)
        said = []
        for build in (_build_memory, _build_disk):
            sentence = build(directory, manifest, force, progress)
            if sentence:
                said.append(sentence)
                _save_manifest(directory, manifest)
    return said


# --- memory guest -------------------------------------------------------------------


def _build_memory(
    directory: Path, manifest: dict[str, Any], force: bool, progress: Progress
) -> str | None:
    source = MEMORY_SOURCE.read_bytes()
    want = {"recipe": MEMORY_RECIPE, "source_sha256": _sha256(source)}
    entry = manifest.get("memory", {})
    if not force and _up_to_date(directory, entry, want):
        return None
    as_ = _require_tool("as", "binutils")
    ld = _require_tool("ld", "binutils")
    progress("building the memory guest")
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        obj = Path(tmp) / "memguest.o"
        elf = Path(tmp) / MEMORY_KERNEL
        _run([as_, "--32", "-o", str(obj), str(MEMORY_SOURCE)], "assembling memguest.S")
        _run([ld, *LD_FLAGS, "-o", str(elf), str(obj)], "linking memguest.elf")
        _install(elf, directory / MEMORY_KERNEL)
    version = _run([as_, "--version"], "asking as for its version").stdout.splitlines()[0]
    manifest["memory"] = {
        **want,
        "assembler": version,
        "outputs": {MEMORY_KERNEL: _sha256_file(directory / MEMORY_KERNEL)},
    }
    return f"built the memory guest {directory / MEMORY_KERNEL}"


# --- disk guest ---------------------------------------------------------------------


def _build_disk(
    directory: Path, manifest: dict[str, Any], force: bool, progress: Progress
) -> str | None:
    busybox = _busybox()
    init = DISK_INIT.read_bytes()
    want = {"recipe": DISK_RECIPE, "init_sha256": _sha256(init), "busybox_sha256": _sha256(busybox)}
    entry = manifest.get("disk", {})
    if not force and _up_to_date(directory, entry, want):
        return None
    for tool, package in (("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")):
        _require_tool(tool, package)
    recorded = None if force else entry.get("kernel_package")
    package = recorded or _resolve_kernel_package()
    try:
        deb = _fetch(package, directory, progress)
    except GuestError:
        if not recorded:
            raise
        package = _resolve_kernel_package()  # the recorded kernel left the archive
        deb = _fetch(package, directory, progress)
    progress(f"building the disk guest from {deb.name}")
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        work = Path(tmp)
        root = work / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
        kernel, config_text, modules_dir = _kernel_files(root, package)
        order = _modules_for(parse_kernel_config(config_text), modules_dir)
        entries = initramfs_entries(
            init, busybox, [(name, (modules_dir / path).read_bytes()) for name, path in order]
        )
        initrd = work / DISK_INITRD
        initrd.write_bytes(gzip.compress(newc_archive(entries), compresslevel=6, mtime=0))
        staged = work / DISK_KERNEL
        shutil.copyfile(kernel, staged)
        _install(staged, directory / DISK_KERNEL)
        _install(initrd, directory / DISK_INITRD)
    version = deb.name.split("_")[1] if deb.name.count("_") >= 2 else ""
    manifest["disk"] = {
        **want,
        "kernel_package": package,
        "kernel_package_version": version,
        "modules": [name for name, _ in order],
        "outputs": {name: _sha256_file(directory / name) for name in (DISK_KERNEL, DISK_INITRD)},
    }
    return (
        f"built the disk guest {directory / DISK_KERNEL} and {DISK_INITRD} from {package} {version}"
    )


def _busybox() -> bytes:
    dpkg_query = _require_tool("dpkg-query", "dpkg")
    status = subprocess.run(
        [dpkg_query, "-W", "-f=${Status}", "busybox-static"], capture_output=True, text=True
    )
    if "install ok installed" not in status.stdout or not BUSYBOX.is_file():
        raise GuestError(
            "busybox-static is not installed: install the Debian package busybox-static (./run setup does it)"
        )
    data = BUSYBOX.read_bytes()
    if not is_static_elf(data):
        raise GuestError(
            f"{BUSYBOX} is not statically linked; install the Debian package busybox-static"
        )
    return data


def _resolve_kernel_package() -> str:
    """The versioned package the metapackage depends on; refreshes apt's lists once if
    apt knows nothing yet."""
    for attempt in range(2):
        proc = subprocess.run(
            ["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True
        )
        package = kernel_package_from_depends(proc.stdout) if proc.returncode == 0 else None
        if package:
            return package
        if attempt == 0:
            _run(["apt-get", "update", "-qq"], "refreshing apt's package lists")
    raise GuestError(
        f"apt knows no package {KERNEL_META_PACKAGE}; check /etc/apt/sources.list "
        "(Debian main) and that apt-get update works"
    )


def _fetch(package: str, directory: Path, progress: Progress) -> Path:
    """The package's .deb, kept in <dir>/debs so rebuilding the initramfs (a changed
    init script, a new busybox) downloads nothing; older kernels' .debs are removed."""
    cache = directory / "debs"
    cache.mkdir(exist_ok=True)
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if not debs:
        progress(f"downloading {package}")
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            _run(["apt-get", "download", "-q", package], f"downloading {package}", cwd=Path(tmp))
            got = sorted(Path(tmp).glob("*.deb"))
            if not got:
                raise GuestError(f"apt-get download {package} left no .deb behind")
            os.replace(got[0], cache / got[0].name)
        debs = sorted(cache.glob(f"{package}_*.deb"))
    for stale in cache.glob("*.deb"):
        if stale != debs[-1]:
            stale.unlink()
    return debs[-1]


def _kernel_files(root: Path, package: str) -> tuple[Path, str, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    configs = sorted((root / "boot").glob("config-*"))
    if not kernels or not configs:
        raise GuestError(
            f"{package} holds no boot/vmlinuz-* and boot/config-*; is it a kernel package?"
        )
    release = kernels[0].name.removeprefix("vmlinuz-")
    return kernels[0], configs[0].read_text(), root / "lib" / "modules" / release


def _modules_for(config: Mapping[str, str], modules_dir: Path) -> list[tuple[str, Path]]:
    """(name, path relative to modules_dir) of every module to load, dependencies first."""
    missing = [symbol for symbol in REQUIRED_BUILTIN if config.get(symbol) != "y"]
    if missing:
        raise GuestError(
            f"the kernel lacks {', '.join(missing)} built in; the disk guest cannot boot with it"
        )
    wanted = []
    for driver, symbol in DRIVERS.items():
        how = config.get(symbol)
        if how == "m":
            wanted.append(driver)
        elif how != "y":
            raise GuestError(f"the kernel has no {driver} driver ({symbol} is not set)")
    found = {_module_name(p): p for p in modules_dir.rglob("*.ko")}
    depends: dict[str, list[str]] = {}
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in depends:
            continue
        if name not in found:
            raise GuestError(f"the kernel module {name} is not in the kernel package")
        depends[name] = module_depends(found[name].read_bytes())
        todo.extend(depends[name])
    return [(name, found[name].relative_to(modules_dir)) for name in load_order(wanted, depends)]


def _module_name(path: Path) -> str:
    return path.name.removesuffix(".ko").replace("-", "_")


# --- pure helpers (unit-tested) -----------------------------------------------------


def kernel_package_from_depends(text: str) -> str | None:
    """``apt-cache depends linux-image-cloud-amd64`` -> the linux-image-<ver> it needs."""
    m = re.search(r"^\s*Depends:\s*(linux-image-\S+)\s*$", text, re.MULTILINE)
    return m[1] if m else None


def parse_kernel_config(text: str) -> dict[str, str]:
    """``CONFIG_X=y``/``=m``/``="str"`` lines; "is not set" lines are left out."""
    config = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            config[key] = value.strip().strip('"')
    return config


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo section (scanned, not ELF-parsed:
    modinfo strings are NUL-separated key=value)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m or not m[1]:
        return []
    return [name.replace("-", "_") for name in m[1].decode().split(",") if name]


def load_order(wanted: list[str], depends: Mapping[str, list[str]]) -> list[str]:
    """Every module ``wanted`` needs, each after its dependencies, each once."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise GuestError(f"the kernel modules depend on each other in a cycle through {name}")
        visiting.add(name)
        for dep in depends.get(name, []):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def is_static_elf(data: bytes) -> bool:
    """An ELF64 executable without a PT_INTERP program header (no dynamic loader)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int  # with the file type bits: 0o040755 directory, 0o100755 file, ...
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


def initramfs_entries(
    init: bytes, busybox: bytes, modules: list[tuple[str, bytes]]
) -> list[CpioEntry]:
    """The disk guest's root: /init, /bin/busybox (applet links made at boot by
    ``busybox --install``), /dev/console for the kernel to open before devtmpfs is
    mounted, and the modules with their load order in /etc/shoal-modules."""
    entries = [
        CpioEntry(d, S_IFDIR | 0o755)
        for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp")
    ]
    entries += [
        CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", S_IFCHR | 0o666, rdev=(1, 3)),
        CpioEntry("bin/busybox", S_IFREG | 0o755, busybox),
        CpioEntry("bin/sh", S_IFLNK | 0o777, b"busybox"),
        CpioEntry("init", S_IFREG | 0o755, init),
        CpioEntry(
            "etc/shoal-modules", S_IFREG | 0o644, "".join(f"{n}\n" for n, _ in modules).encode()
        ),
    ]
    entries += [
        CpioEntry(f"lib/modules/{name}.ko", S_IFREG | 0o644, data) for name, data in modules
    ]
    return entries


def newc_archive(entries: list[CpioEntry]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks: per entry a 110-byte
    ASCII header (magic 070701 and 13 eight-digit hex fields), the NUL-terminated name
    and the data, each padded to 4 bytes; then a TRAILER!!! entry. Owner root, mtime 0,
    so the same inputs give the same bytes."""
    out = bytearray()

    def add(ino: int, entry: CpioEntry) -> None:
        name = entry.name.encode() + b"\0"
        fields = (
            ino,
            entry.mode,
            0,
            0,
            2 if entry.mode & S_IFDIR == S_IFDIR else 1,
            0,
            len(entry.data),
            0,
            0,
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,
        )
        out.extend(b"070701" + b"".join(b"%08x" % f for f in fields) + name)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(entry.data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate(entries, start=1):
        add(ino, entry)
    add(0, CpioEntry("TRAILER!!!", 0))
    return bytes(out)


# --- plumbing -----------------------------------------------------------------------


def _up_to_date(directory: Path, entry: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    if any(entry.get(key) != value for key, value in want.items()):
        return False
    outputs = entry.get("outputs") or {}
    return bool(outputs) and all(
        (directory / name).is_file() and _sha256_file(directory / name) == digest
        for name, digest in outputs.items()
    )


def _require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestError(
            f"{name} is missing: install the Debian package {package} (./run setup does it)"
        )
    return path


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GuestError(f"{what} failed: {err}") from err
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("E:")] or lines
        detail = errors[-1].strip() if errors else f"exit status {proc.returncode}"
        raise GuestError(f"{what} failed: {detail}")
    return proc


def _install(staged: Path, final: Path) -> None:
    staged.chmod(0o644)
    os.replace(staged, final)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_manifest(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    manifest["format"] = 1
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
