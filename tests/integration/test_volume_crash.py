"""Crash consistency of the volume metadata: SIGKILL a random workload at random instants.

A worker process opens a small volume (``offline=False``: no offline-tool lease, so the
next open does not wait for a dead holder) and runs random metadata operations from a
seeded RNG: mkdir, create (sparse or preallocated, with a size), pwrite of a
deterministic pattern (often into holes, so it allocates), resize up and down, discard,
write_zeroes, rename and remove. Before each operation it appends ``B <op as JSON>`` to
an ack log, after it returns ``A`` (``F`` if it failed with VolumeFull), each with one
``os.write`` so the line survives SIGKILL.

The parent kills the worker after a random 0.02-0.3 s (sometimes while it is still
opening, i.e. in the open-time checkpoint), then checks in-process:

1. ``fsck`` of the crashed image (checkpoint + journal replay, no repair) is clean;
2. ``Volume.open`` replays the journal;
3. the namespace, kinds, preallocated flags, sizes and every byte of every file equal
   the model after all acknowledged operations, or that plus the one pending operation
   — never anything in between. The only tolerance: a pending pwrite/write_zeroes may
   have reached some of its bytes (data is written in place, not journalled), so inside
   its range each byte is old or new; everything else about it must be exactly before
   or after.

The state carries over from trial to trial (the next model is what was verified), so
the volume ages: checkpoints wrap the journal, units are reused, files fragment. When
the volume is more than 70 % used it is reformatted.

To prove the harness can fail, ``test_harness_catches_unsafe_acks`` runs it against a
worker whose journal acknowledges transactions before writing them (a monkeypatch inside
the worker process; shoal's code is not changed) and expects a reported failure.

Run as a script: ``--worker`` is the worker (reads its job from stdin), ``--trials N``
the long stress run (see also bench/crash_stress.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # run as a script: make ``shoal`` importable from the checkout
    sys.path.insert(0, str(REPO))

from shoal.volume import Volume, format_volume  # noqa: E402
from shoal.volume.errors import VolumeFull  # noqa: E402
from shoal.volume.fsck import fsck  # noqa: E402

VOLUME_SIZE = 64 << 20
UNIT = 64 << 10
MAX_FILE = 12 * UNIT
MAX_FILES = 40
MAX_DIRS = 12
REFORMAT_USED = 0.70
TORN_OK = ("write", "zero")  # data written in place: a pending one may be partly there

Op = dict[str, object]


def pattern(tag: int, n: int) -> bytes:
    """The deterministic bytes a ``write`` with ``tag`` puts down (never all zero)."""
    block = hashlib.sha256(tag.to_bytes(8, "little")).digest() * 37  # 1184 B, not a power of 2
    return (block * (n // len(block) + 1))[:n]


# ---- the model ---------------------------------------------------------------------------

@dataclass
class Node:
    kind: str  # "d" or "f"
    data: bytearray = field(default_factory=bytearray)
    pre: bool = False


Model = dict[str, Node]  # absolute path -> node; "/" is implicit
State = dict[str, tuple[str, bytes, bool]]


def copy_model(model: Model) -> Model:
    return {p: Node(n.kind, bytearray(n.data), n.pre) for p, n in model.items()}


def as_state(model: Model) -> State:
    return {p: (n.kind, bytes(n.data), n.pre) for p, n in model.items()}


def apply_op(model: Model, op: Op) -> None:
    """What ``op`` does to the namespace and file contents (the specification)."""
    kind, path = op["o"], str(op["p"])
    if kind == "mkdir":
        model[path] = Node("d")
    elif kind == "create":
        model[path] = Node("f", bytearray(int(op["size"])), bool(op["pre"]))  # type: ignore[call-overload]
    elif kind == "remove":
        del model[path]
    elif kind == "rename":
        dst = str(op["d"])
        for p in [p for p in model if p == path or p.startswith(path + "/")]:
            model[dst + p[len(path):]] = model.pop(p)
    else:
        node = model[path]
        off, n = int(op.get("off", 0)), int(op.get("len", 0))  # type: ignore[call-overload]
        if kind == "write":
            node.data[off : off + n] = pattern(int(op["tag"]), n)  # type: ignore[call-overload]
        elif kind == "zero":
            node.data[off : off + n] = bytes(n)
        elif kind == "discard":
            if not node.pre:
                first, end = -(-off // UNIT), (off + n) // UNIT
                if end > first:
                    node.data[first * UNIT : end * UNIT] = bytes((end - first) * UNIT)
        elif kind == "resize":
            size = int(op["size"])  # type: ignore[call-overload]
            if size < len(node.data):
                del node.data[size:]
            else:
                node.data.extend(bytes(size - len(node.data)))
        else:
            raise AssertionError(f"unknown op {op}")


def read_state(vol: Volume) -> State:
    out: State = {}
    stack = ["/"]
    while stack:
        for st in vol.listdir(stack.pop()):
            if st.kind == "directory":
                out[st.path] = ("d", b"", False)
                stack.append(st.path)
            else:
                data = vol.open_file(st.path).pread(0, st.size) if st.size else b""
                out[st.path] = ("f", data, st.preallocated)
    return out


def _diff(want: State, got: State) -> str:
    for p in sorted(set(want) | set(got)):
        if p not in got:
            return f"{p} missing"
        if p not in want:
            return f"{p} should not exist ({got[p][0]}, {len(got[p][1])} bytes)"
        w, g = want[p], got[p]
        if w[0] != g[0] or w[2] != g[2]:
            return f"{p}: kind/preallocated {g[0]}/{g[2]}, want {w[0]}/{w[2]}"
        if len(w[1]) != len(g[1]):
            return f"{p}: size {len(g[1])}, want {len(w[1])}"
        if w[1] != g[1]:
            i = next(i for i in range(len(w[1])) if w[1][i] != g[1][i])
            return f"{p}: content differs from byte {i}"
    return "equal"


def _torn_ok(before: State, after: State, got: State, path: str) -> bool:
    """``got`` is ``before`` except that some bytes of ``path`` already hold ``after``'s."""
    if set(got) != set(before) or any(got[p] != before[p] for p in got if p != path):
        return False
    b, a, g = before[path], after[path], got[path]
    if g[0] != b[0] or g[2] != b[2] or len(g[1]) != len(b[1]):
        return False
    return all(x == y or x == z for x, y, z in zip(g[1], b[1], a[1], strict=True))


# ---- the worker ----------------------------------------------------------------------------

class Workload:
    """Chooses valid random operations from the worker's view of the namespace."""

    def __init__(self, vol: Volume, rng: random.Random, tag_base: int):
        self.vol, self.rng, self.tag = vol, rng, tag_base
        self.dirs: set[str] = {"/"}
        self.files: dict[str, tuple[int, bool]] = {}
        for path, kind, size, pre in self._walk():
            if kind == "d":
                self.dirs.add(path)
            else:
                self.files[path] = (size, pre)

    def _walk(self) -> list[tuple[str, str, int, bool]]:
        out, stack = [], ["/"]
        while stack:
            for st in self.vol.listdir(stack.pop()):
                if st.kind == "directory":
                    stack.append(st.path)
                out.append((st.path, st.kind[0], st.size, st.preallocated))
        return out

    def _new_path(self) -> str:
        parent = self.rng.choice(sorted(self.dirs))
        while True:
            name = f"{self.rng.choice('abcdefgh')}{self.rng.randrange(100)}"
            path = parent.rstrip("/") + "/" + name
            if path not in self.dirs and path not in self.files:
                return path

    def _size(self) -> int:
        r = self.rng.random()
        if r < 0.15:
            return 0
        if r < 0.45:
            return self.rng.randrange(1, 4) * UNIT  # aligned
        return self.rng.randrange(1, MAX_FILE)

    def choose(self) -> Op:
        rng = self.rng
        info = self.vol.info()
        low = int(info["free_units"]) < int(info["units"]) * 0.4  # type: ignore[call-overload]
        nonempty = sorted(p for p, (s, _) in self.files.items() if s)
        choices: list[tuple[str, float]] = [
            ("mkdir", 1.0 if len(self.dirs) < MAX_DIRS else 0.0),
            ("create", 2.0 if len(self.files) < MAX_FILES and not low else 0.0),
            ("write", 6.0 if nonempty else 0.0),
            ("resize", 2.0 if self.files else 0.0),
            ("discard", 1.0 if nonempty else 0.0),
            ("zero", 1.0 if nonempty else 0.0),
            ("rename", 1.5 if len(self.dirs) + len(self.files) > 1 else 0.0),
            ("remove", (6.0 if low else 1.5) if len(self.dirs) + len(self.files) > 1 else 0.0),
        ]
        kind = rng.choices([c for c, _ in choices], [w for _, w in choices])[0]
        if kind == "mkdir":
            return {"o": "mkdir", "p": self._new_path()}
        if kind == "create":
            pre = rng.random() < 0.25
            size = min(self._size(), 6 * UNIT) if pre else self._size()
            return {"o": "create", "p": self._new_path(), "size": size, "pre": pre}
        if kind == "resize":
            path = rng.choice(sorted(self.files))
            size = self._size() // (3 if low else 1)
            if self.files[path][1]:
                size = min(size, 6 * UNIT)
            return {"o": "resize", "p": path, "size": size}
        if kind in ("write", "discard", "zero"):
            path = rng.choice(nonempty)
            size = self.files[path][0]
            off = rng.randrange(size)
            if rng.random() < 0.3:
                off -= off % UNIT
            n = rng.randrange(1, min(size - off, 3 * UNIT) + 1)
            self.tag += 1
            return {"o": kind, "p": path, "off": off, "len": n, "tag": self.tag}
        if kind == "rename":
            src = rng.choice(sorted((self.dirs - {"/"}) | set(self.files)))
            while True:
                dst = self._new_path()
                if not (src in self.dirs and (dst + "/").startswith(src + "/")):
                    return {"o": "rename", "p": src, "d": dst}
        # remove: a file, or an empty directory
        empty = {d for d in self.dirs - {"/"} if not any(p.startswith(d + "/") for p in self.dirs | set(self.files))}
        cands = sorted(set(self.files) | empty)
        if not cands:
            return {"o": "mkdir", "p": self._new_path()}
        return {"o": "remove", "p": rng.choice(cands)}

    def run(self, op: Op) -> None:
        vol, kind, path = self.vol, op["o"], str(op["p"])
        off, n = int(op.get("off", 0)), int(op.get("len", 0))  # type: ignore[call-overload]
        if kind == "mkdir":
            vol.mkdir(path)
            self.dirs.add(path)
        elif kind == "create":
            vol.create(path, int(op["size"]), preallocate=bool(op["pre"]))  # type: ignore[call-overload]
            self.files[path] = (int(op["size"]), bool(op["pre"]))  # type: ignore[call-overload]
        elif kind == "write":
            vol.open_file(path).pwrite(off, pattern(int(op["tag"]), n))  # type: ignore[call-overload]
        elif kind == "zero":
            vol.open_file(path).write_zeroes(off, n)
        elif kind == "discard":
            vol.open_file(path).discard(off, n)
        elif kind == "resize":
            vol.resize(path, int(op["size"]))  # type: ignore[call-overload]
            self.files[path] = (int(op["size"]), self.files[path][1])  # type: ignore[call-overload]
        elif kind == "remove":
            vol.remove(path)
            self.dirs.discard(path)
            self.files.pop(path, None)
        elif kind == "rename":
            dst = str(op["d"])
            vol.rename(path, dst)
            self.dirs = {dst + d[len(path):] if d == path or d.startswith(path + "/") else d for d in self.dirs}
            self.files = {dst + f[len(path):] if f == path or f.startswith(path + "/") else f: v
                          for f, v in self.files.items()}


def _break_journal() -> None:
    """Self-test only: acknowledge most transactions before their record is written."""
    from shoal.volume import journal

    real_wait = journal.Journal.wait
    lie = random.Random(1)

    def wait(self: journal.Journal, ticket: int) -> None:
        if lie.random() < 0.9:
            return
        real_wait(self, ticket)

    def flush_all(self: journal.Journal) -> None:
        real_wait(self, self._submitted)

    journal.Journal.wait = wait  # type: ignore[method-assign]
    journal.Journal.flush_all = flush_all  # type: ignore[method-assign]


def worker_main() -> int:
    """Read ``volume<TAB>log<TAB>seed<TAB>broken`` from stdin, then work until killed."""
    line = sys.stdin.readline()
    if not line:
        return 0
    path, log, seed, broken = line.rstrip("\n").split("\t")
    if broken == "1":
        _break_journal()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rng = random.Random(int(seed))
    try:
        vol = Volume.open(path, offline=False)
        os.write(fd, b"R\n")
        work = Workload(vol, rng, int(seed) << 20)
        for _ in range(200_000):
            op = work.choose()
            os.write(fd, b"B " + json.dumps(op).encode() + b"\n")
            try:
                work.run(op)
            except VolumeFull:
                os.write(fd, b"F\n")
                continue
            os.write(fd, b"A\n")
        vol.close()
        os.write(fd, b"D\n")
    except BaseException:
        os.write(fd, b"X " + traceback.format_exc().replace("\n", "\\n").encode() + b"\n")
        return 3
    return 0


# ---- the parent ------------------------------------------------------------------------------

@dataclass
class Stats:
    trials: int = 0
    failures: list[str] = field(default_factory=list)
    acked: int = 0
    killed_mid_op: int = 0  # a B line without its A when killed
    pending_applied: int = 0  # ... and the volume showed the op done
    torn: int = 0  # a pending data write partly on disk
    killed_in_open: int = 0  # killed before the worker finished opening
    reformats: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.trials} trials, {len(self.failures)} failures, {self.seconds:.1f} s "
                f"({self.seconds / max(self.trials, 1) * 1000:.0f} ms/trial); {self.acked} acked ops, "
                f"killed mid-op {self.killed_mid_op} (pending op found applied {self.pending_applied}, "
                f"torn data write {self.torn}), killed while opening {self.killed_in_open}, "
                f"reformats {self.reformats}")


def _spawn(workdir: Path, n: int) -> tuple[subprocess.Popen[bytes], Path]:
    err = workdir / f"worker-{n % 2}.err"
    with open(err, "wb") as f:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=f, cwd=str(REPO))
    return proc, err


def _parse_log(raw: bytes) -> tuple[list[Op], Op | None, bool, str | None]:
    """(acked ops, the pending op, worker was ready, worker error)."""
    acked: list[Op] = []
    pending: Op | None = None
    ready, error = False, None
    for line in raw.split(b"\n")[:-1]:  # a last line without newline was cut by the kill
        tag, _, rest = line.partition(b" ")
        if tag == b"R":
            ready = True
        elif tag == b"B":
            assert pending is None, "two B lines in a row"
            pending = json.loads(rest)
        elif tag == b"A":
            assert pending is not None
            acked.append(pending)
            pending = None
        elif tag == b"F":
            pending = None
        elif tag == b"X":
            error = rest.decode(errors="replace").replace("\\n", "\n")
    return acked, pending, ready, error


def run_trials(trials: int, workdir: Path, *, seed: int = 0, broken: bool = False,
               stop_on_failure: bool = False, progress: bool = False) -> Stats:
    workdir.mkdir(parents=True, exist_ok=True)
    vol_path = str(workdir / "vol.img")
    log = workdir / "ack.log"
    rng = random.Random(seed)
    stats = Stats()
    start = time.monotonic()

    def reformat() -> None:
        if os.path.exists(vol_path):
            os.unlink(vol_path)
        format_volume(vol_path, VOLUME_SIZE, unit_size=UNIT, name="crash")

    reformat()
    model: Model = {}
    nxt = _spawn(workdir, 0)
    try:
        for t in range(trials):
            proc, err_path = nxt
            wseed = rng.randrange(1 << 30)
            log.write_bytes(b"")
            assert proc.stdin is not None
            proc.stdin.write(f"{vol_path}\t{log}\t{wseed}\t{int(broken)}\n".encode())
            proc.stdin.flush()
            if rng.random() < 0.1:
                time.sleep(rng.uniform(0.0, 0.03))  # may land in open's replay/checkpoint
            else:
                deadline = time.monotonic() + 10
                while not log.read_bytes().startswith(b"R") and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.02, 0.3))
            proc.kill()
            rc = proc.wait()
            nxt = _spawn(workdir, t + 1)  # its start-up overlaps the verification
            where = f"trial {t} (harness seed {seed}, worker seed {wseed})"
            raw = log.read_bytes()
            acked, pending, ready, error = _parse_log(raw)
            if error or (rc != -signal.SIGKILL and not raw.endswith(b"D\n")):
                stats.failures.append(f"{where}: worker failed (rc {rc}): {error or err_path.read_text()}")
                break
            failure = verify(vol_path, model, acked, pending, stats)
            stats.trials += 1
            stats.acked += len(acked)
            stats.killed_in_open += not ready
            if failure:
                stats.failures.append(f"{where}: {failure}")
                if stop_on_failure:
                    break
                # carry on from what is on disk
                with Volume.open(vol_path, offline=False) as vol:
                    state = read_state(vol)
                model = {p: Node(k, bytearray(d), pre) for p, (k, d, pre) in state.items()}
            with Volume.open(vol_path, offline=False, writable=False) as vol:
                full = vol.meta.used_units > REFORMAT_USED * vol.sb.unit_count
            if full:
                reformat()
                model = {}
                stats.reformats += 1
            if progress and (t + 1) % 100 == 0:
                print(f"  {t + 1}/{trials}: {len(stats.failures)} failures", flush=True)
    finally:
        proc, _ = nxt
        proc.kill()
        proc.wait()
    stats.seconds = time.monotonic() - start
    return stats


def verify(vol_path: str, model: Model, acked: list[Op], pending: Op | None, stats: Stats) -> str | None:
    """Check the crashed volume against the model; on success ``model`` becomes what is there."""
    report = fsck(vol_path)
    if report.exit_code != 0:
        return f"fsck of the crashed volume: {report.error or [p.message for p in report.problems]}"
    for op in acked:
        apply_op(model, op)
    try:
        with Volume.open(vol_path, offline=False) as vol:
            got = read_state(vol)
    except Exception as err:  # noqa: BLE001 - any failure to open is the finding
        return f"open after the crash failed: {type(err).__name__}: {err}"
    before = as_state(model)
    if got == before:
        if pending is not None:
            stats.killed_mid_op += 1
        return None
    if pending is None:
        return f"state differs from the acknowledged operations: {_diff(before, got)}"
    stats.killed_mid_op += 1
    after_model = copy_model(model)
    apply_op(after_model, pending)
    after = as_state(after_model)
    if got == after:
        stats.pending_applied += 1
    elif pending["o"] in TORN_OK and _torn_ok(before, after, got, str(pending["p"])):
        stats.torn += 1
    else:
        return (f"state is neither before nor after the pending {pending}: vs before: "
                f"{_diff(before, got)}; vs after: {_diff(after, got)}")
    model.clear()
    model.update({p: Node(k, bytearray(d), pre) for p, (k, d, pre) in got.items()})
    return None


# ---- the tests --------------------------------------------------------------------------------

def test_sigkill_random_metadata_workload(tmp_path: Path) -> None:
    stats = run_trials(200, tmp_path, seed=20261124)
    print(stats.summary())
    assert not stats.failures, "\n".join(stats.failures[:5]) + "\n" + stats.summary()
    assert stats.trials == 200
    # the kills really landed inside a busy workload, and aged the volume
    assert stats.acked > 200 * 20, stats.summary()
    assert stats.killed_mid_op > 100, stats.summary()
    assert stats.pending_applied > 0, stats.summary()


def test_harness_catches_unsafe_acks(tmp_path: Path) -> None:
    """A journal that acknowledges before writing must be caught within a few trials."""
    stats = run_trials(30, tmp_path, seed=7, broken=True, stop_on_failure=True)
    assert stats.failures, "the harness did not notice acknowledged operations that were lost: " + stats.summary()
    assert "worker failed" not in stats.failures[0], stats.failures[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    args = p.parse_args(argv)
    if args.worker:
        return worker_main()
    import tempfile

    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    with tempfile.TemporaryDirectory(prefix="shoal-crash-") as tmp:
        stats = run_trials(args.trials, Path(args.dir or tmp), seed=seed, progress=True)
    print(f"seed {seed}: {stats.summary()}")
    for f in stats.failures[:20]:
        print(f"FAIL {f}")
    return 1 if stats.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
