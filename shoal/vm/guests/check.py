"""Pure checkers for what the test guests leave behind: memory dumps and serial logs.

No I/O: callers (``shoal vm verify``, tests) pause the VM, dump memory with QMP
``pmemsave``, read the serial log, and pass the bytes and text in.

Memory guest header, at guest-physical ``HEADER_ADDR`` (0x5000), little-endian::

    offset size  field
    0      8     magic      b"SHOALMEM"
    8      4     version    u32, 1
    12     4     page_size  u32, 4096
    16     4     start      u32, first byte of the dirtied range (page-aligned, >= 2 MiB)
    20     4     end        u32, one past the last byte (page-aligned)
    24     4     rate       u32, target dirty rate in MiB/s, 0 = as fast as it can
    28     4     passes     u32, full passes over the range since boot

The invariant ``check_memory`` tests: the guest zeroes [start, end) at boot (before
the header and the start line appear), then adds one to byte 0 of every page in page
order, over and over, and writes nothing else in the range. At any pause the pages
before the guest's cursor hold v+1 and the rest hold v (mod 256), or all hold the same
value; every other byte of the range is zero.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from shoal.vm.errors import GuestError

PAGE_SIZE = 4096
HEADER_ADDR = 0x5000
HEADER_MAGIC = b"SHOALMEM"
HEADER_VERSION = 1
HEADER_FORMAT = "<8sIIIIII"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)  # 32
RANGE_MIN = 0x200000

_MEM_START = re.compile(r"shoal-memguest start rate=(\d+) range=0x([0-9a-f]+)-0x([0-9a-f]+)")
_MEM_PASS = re.compile(r"shoal-memguest pass=(\d+)")
_MEM_FATAL = re.compile(r"shoal-memguest FATAL (.*)")

_DISK_START = re.compile(r"shoal-disk start blocks=(\d+)")
_DISK_RESUME = re.compile(r"shoal-disk resume round=(\d+) block=(\d+) ok=(\d+) errors=(\d+)")
_DISK_ROUND = re.compile(r"shoal-disk round=(\d+) ok=(\d+) errors=(\d+)")
_DISK_ERROR = re.compile(r"shoal-disk ERROR (block=\d+ expected=\S+ got=\S+)")
_DISK_FATAL = re.compile(r"shoal-disk FATAL (.*)")


@dataclass(frozen=True)
class MemoryHeader:
    version: int
    page_size: int
    start: int
    end: int
    rate: int
    passes: int

    @property
    def pages(self) -> int:
        return (self.end - self.start) // self.page_size


def parse_header(data: bytes) -> MemoryHeader:
    """The header read from guest-physical HEADER_ADDR; GuestError if it is not one."""
    if len(data) < HEADER_SIZE:
        raise GuestError(f"the memory guest's header is {HEADER_SIZE} bytes, got {len(data)}")
    magic, version, page_size, start, end, rate, passes = struct.unpack_from(HEADER_FORMAT, data)
    if magic != HEADER_MAGIC:
        raise GuestError(
            f"no memory guest header at 0x{HEADER_ADDR:x} (magic {magic!r}); "
            "is the VM running the memory guest, and has it booted?"
        )
    if version != HEADER_VERSION:
        raise GuestError(
            f"the memory guest's header has version {version}; this shoal reads {HEADER_VERSION}"
        )
    if page_size != PAGE_SIZE or start % page_size or end % page_size or not start < end:
        raise GuestError(
            f"the memory guest's header is inconsistent (page size {page_size}, "
            f"range 0x{start:x}-0x{end:x})"
        )
    return MemoryHeader(version, page_size, start, end, rate, passes)


@dataclass(frozen=True)
class MemoryVerdict:
    """``step_addr`` is the first page still at the older value (where the guest was),
    None when every page holds the same value; ``ahead``/``behind`` are the values before
    and after the step (equal when there is none)."""

    ok: bool
    explanation: str
    pages: int
    step_addr: int | None
    ahead: int
    behind: int


def check_memory(
    dump: bytes,
    base_addr: int | MemoryHeader,
    start: int | None = None,
    end: int | None = None,
    page_size: int = PAGE_SIZE,
    *,
    untouched_zero: bool = True,
) -> MemoryVerdict:
    """Check a dump of guest-physical memory from ``base_addr`` against the invariant
    above for the range [start, end); ``check_memory(dump, header)`` is short for a dump
    of exactly the header's range. ``untouched_zero`` also requires every byte the guest
    never writes to be zero. GuestError when the dump does not cover the range."""
    if isinstance(base_addr, MemoryHeader):
        header = base_addr
        base_addr, start, end, page_size = header.start, header.start, header.end, header.page_size
    if start is None or end is None:
        raise GuestError("check_memory needs the guest's range: pass its header, or start and end")
    if page_size <= 0 or start % page_size or end % page_size or not start < end:
        raise GuestError(f"0x{start:x}-0x{end:x} is not a range of whole {page_size}-byte pages")
    if base_addr > start or base_addr + len(dump) < end:
        raise GuestError(
            f"the dump covers 0x{base_addr:x}-0x{base_addr + len(dump):x}, "
            f"not the guest's range 0x{start:x}-0x{end:x}"
        )
    region = bytes(memoryview(dump)[start - base_addr : end - base_addr])
    values = region[::page_size]
    pages = len(values)

    first = start  # narrowed to int for the closure

    def addr(index: int) -> int:
        return first + index * page_size

    ahead = values[0]
    rest = values.lstrip(bytes([ahead]))
    if not rest:
        verdict = MemoryVerdict(
            True, f"all {pages} pages hold 0x{ahead:02x}", pages, None, ahead, ahead
        )
    else:
        step = pages - len(rest)
        behind = rest[0]
        after = rest.lstrip(bytes([behind]))
        if after:
            second = pages - len(after)
            return MemoryVerdict(
                False,
                f"two steps in the dirtied pages: 0x{ahead:02x} to 0x{behind:02x} at page "
                f"0x{addr(step):x} and 0x{behind:02x} to 0x{after[0]:02x} at page "
                f"0x{addr(second):x}; the guest only ever leaves one",
                pages,
                addr(step),
                ahead,
                behind,
            )
        if (ahead - behind) % 256 != 1:
            return MemoryVerdict(
                False,
                f"the pages up to 0x{addr(step):x} hold 0x{ahead:02x} and the rest 0x{behind:02x}; "
                "the guest only ever leaves a step of one down",
                pages,
                addr(step),
                ahead,
                behind,
            )
        verdict = MemoryVerdict(
            True,
            f"{pages} pages: 0x{ahead:02x} before page 0x{addr(step):x} and 0x{behind:02x} from it on, "
            "one step where the guest was",
            pages,
            addr(step),
            ahead,
            behind,
        )
    if untouched_zero:
        stray = _first_stray_byte(region, values, page_size)
        if stray is not None:
            offset, value = stray
            return MemoryVerdict(
                False,
                f"byte 0x{start + offset:x} holds 0x{value:02x}; the guest writes only the "
                "first byte of each page and the rest of the range must be zero",
                pages,
                verdict.step_addr,
                verdict.ahead,
                verdict.behind,
            )
    return verdict


def _first_stray_byte(region: bytes, values: bytes, page_size: int) -> tuple[int, int] | None:
    """The first non-zero byte at a page offset other than 0, if any (fast path: count)."""
    nonzero = len(region) - region.count(0)
    if nonzero == len(values) - values.count(0):
        return None
    for page in range(0, len(region), page_size):
        body = region[page + 1 : page + page_size]
        trimmed = body.lstrip(b"\0")
        if trimmed:
            offset = page + 1 + len(body) - len(trimmed)
            return offset, region[offset]
    return None  # unreachable: the counts differed


@dataclass(frozen=True)
class MemoryLogVerdict:
    """What the memory guest's serial log says: ``boots`` is the number of start lines,
    ``last_pass`` the latest progress figure, ``rate``/``start``/``end`` from the latest
    start line."""

    ok: bool
    explanation: str
    boots: int
    last_pass: int | None
    rate: int | None
    start: int | None
    end: int | None


def check_memory_log(text: str) -> MemoryLogVerdict:
    """The guest must have started, said nothing fatal, and its pass count must never go
    down within one boot (memory moving back in time, e.g. a stale migration)."""
    boots = 0
    last_pass: int | None = None
    rate = start = end = None
    problem = ""
    for line in text.splitlines():
        if m := _MEM_START.search(line):
            boots += 1
            last_pass = None
            rate, start, end = int(m[1]), int(m[2], 16), int(m[3], 16)
        elif m := _MEM_PASS.search(line):
            passes = int(m[1])
            if last_pass is not None and passes < last_pass and not problem:
                problem = f"the pass count went back from {last_pass} to {passes} without a restart"
            last_pass = passes
        elif (m := _MEM_FATAL.search(line)) and not problem:
            problem = f"the memory guest stopped: {m[1].strip()}"
    if boots == 0 and not problem:
        problem = "the memory guest never started (no 'shoal-memguest start' line)"
    if problem:
        return MemoryLogVerdict(False, problem, boots, last_pass, rate, start, end)
    progress = f"at pass {last_pass}" if last_pass is not None else "no progress line yet"
    return MemoryLogVerdict(
        True, f"booted {boots} time(s), {progress}", boots, last_pass, rate, start, end
    )


@dataclass(frozen=True)
class DiskVerdict:
    """What the disk guest's serial log says. ``rounds`` counts completed rounds (round
    lines), ``verified`` sums their ok= and the resume lines' ok=, ``errors``
    counts mismatches (errors= of each summary line, plus ERROR lines after the last
    summary of a boot), ``boots`` counts start lines, ``last_round`` is the latest
    completed round, ``error_lines`` the first few ERROR lines."""

    ok: bool
    explanation: str
    boots: int
    rounds: int
    verified: int
    errors: int
    last_round: int | None
    error_lines: tuple[str, ...] = ()


def check_disk_log(text: str) -> DiskVerdict:
    """Besides the guest's own errors, the disk must never go back in time across a
    restart: a boot that resumes (or starts afresh) behind the last round an earlier
    boot completed has lost acknowledged writes."""
    boots = rounds = verified = errors = 0
    pending = 0  # ERROR lines not yet covered by a summary line
    last_round: int | None = None
    shown: list[str] = []
    problems: list[str] = []
    resumed = True
    blocks = 0
    for line in text.splitlines():
        if m := _DISK_START.search(line):
            errors += pending
            pending = 0
            boots += 1
            blocks = int(m[1])
            resumed = False
        elif m := _DISK_RESUME.search(line):
            round_, block, ok, errs = (int(g) for g in m.groups())
            resumed = True
            verified += ok
            errors += errs
            pending = 0
            # Blocks [0, P) are at round R: round R is complete if P covers the region,
            # otherwise R-1 is the last complete one.
            held = round_ if block >= blocks else round_ - 1
            if last_round is not None and held < last_round:
                problems.append(
                    f"after restart {boots - 1} the disk held round {held} complete though round "
                    f"{last_round} had completed: acknowledged writes were lost"
                )
        elif m := _DISK_ROUND.search(line):
            round_, ok, errs = (int(g) for g in m.groups())
            if not resumed and last_round is not None and boots > 1:
                problems.append(
                    f"after restart {boots - 1} the disk had no stamps though round {last_round} "
                    "had completed: the disk was replaced or wiped"
                )
            resumed = True
            rounds += 1
            verified += ok
            errors += errs
            pending = 0
            last_round = round_
        elif m := _DISK_ERROR.search(line):
            pending += 1
            if len(shown) < 5:
                shown.append(line.strip())
        elif m := _DISK_FATAL.search(line):
            problems.append(f"the disk guest stopped: {m[1].strip()}")
    errors += pending
    if boots == 0:
        problems.append("the disk guest never started (no 'shoal-disk start' line)")
    if errors:
        first = f"; first: {shown[0]}" if shown else ""
        problems.insert(0, f"{errors} block(s) did not hold what the guest last wrote{first}")
    summary = f"{rounds} round(s) over {boots} boot(s), {verified} block reads verified"
    if problems:
        return DiskVerdict(
            False,
            f"{problems[0]} ({summary})",
            boots,
            rounds,
            verified,
            errors,
            last_round,
            tuple(shown),
        )
    return DiskVerdict(
        True, f"{summary}, no errors", boots, rounds, verified, errors, last_round, tuple(shown)
    )
