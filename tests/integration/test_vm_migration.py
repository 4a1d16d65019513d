"""Live and quick migration between two local QEMU processes (TCG, loopback TCP).

The guests are the multiboot images of test_vm_qemu: an idle one that prints a line and
halts, and one that keeps rewriting every page of a few MiB, which no small bandwidth
cap can keep up with."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shoal.vm.convergence import Ladder
from shoal.vm.errors import MigrationAborted, MigrationError
from shoal.vm.migration import (
    MigrationSettings,
    Progress,
    load_command,
    load_state,
    prepare_incoming,
    run_live_migration,
    save_command,
    save_state,
    wait_incoming,
)
from shoal.vm.qemu import Qemu, find_vm_processes
from tests.integration.nbd_helpers import require
from tests.integration.test_vm_qemu import (
    LOAD_ADDR,
    guest_kernel,
    make_qemu,
    run,
    unique,
    wait_serial,
)

pytestmark = pytest.mark.qemu

MiB = 1 << 20


@contextlib.asynccontextmanager
async def pair(work: Path, kernel: str, *, memory_mib: int = 32) -> AsyncIterator[tuple[Qemu, Qemu]]:
    """A running source and a paused destination waiting for ``migrate-incoming``."""
    name = unique("mig")
    src = make_qemu(work, name, kernel=kernel, memory_mib=memory_mib)
    dst = make_qemu(work / "dst", name, kernel=kernel, memory_mib=memory_mib,
                    incoming=True, start_paused=True)
    try:
        await src.start()
        await dst.start()
        await wait_serial(work, name, b"\n")
        yield src, dst
    finally:
        for vm in (src, dst):
            vm.kill()
        for vm in (src, dst):
            with contextlib.suppress(Exception):
                await vm.wait_exit()
        assert find_vm_processes(name) == {}


@pytest.fixture
def work() -> Iterator[Path]:
    """A short directory (unix socket paths must stay under 108 bytes), with dst/ for
    the destination's files."""
    require("qemu-system-x86_64")
    d = Path(tempfile.mkdtemp(prefix="shoal-mig-", dir="/tmp"))
    (d / "dst").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def exits_soon(vm: Qemu, timeout_s: float = 10) -> int:
    return await asyncio.wait_for(vm.wait_exit(), timeout_s)


def test_idle_vm_live_migration(work: Path) -> None:
    async def scenario() -> dict[str, float]:
        async with pair(work, guest_kernel(work, b"MIGRATE-ME\n")) as (src, dst):
            uri = await prepare_incoming(dst, "tcp:127.0.0.1:0", MigrationSettings())
            assert uri.startswith("tcp:127.0.0.1:") and not uri.endswith(":0")
            seen: list[str] = []

            async def on_switchover() -> None:
                seen.append(await src.status())

            incoming = asyncio.create_task(wait_incoming(dst))
            stats = await run_live_migration(src, uri, MigrationSettings(), on_switchover)
            await asyncio.wait_for(incoming, 10)
            assert seen == ["finish-migrate"]  # the hook runs with the guest stopped
            assert await src.status() == "postmigrate"
            assert await dst.status() == "paused"  # nothing runs until the caller commits
            await dst.cont()  # the commit point is the caller's: here, at once
            resumed = time.monotonic()
            assert await dst.status() == "running"
            await dst.pmemsave(LOAD_ADDR, 4096, work / "dst-mem.bin")
            assert b"MIGRATE-ME" in (work / "dst-mem.bin").read_bytes()

            assert stats.stopped_at is not None
            assert stats.started_at < stats.stopped_at < stats.completed_at
            assert 0 < stats.total_time_ms < 10_000
            assert 0 <= stats.downtime_ms < 2_000
            assert stats.transferred_bytes > 0 and stats.iterations >= 1
            assert stats.steps == () and not stats.postcopy
            return {"total_ms": stats.total_time_ms, "qemu_downtime_ms": stats.downtime_ms,
                    "end_to_end_downtime_ms": (resumed - stats.stopped_at) * 1000,
                    "setup_ms": stats.setup_time_ms, "transferred": stats.transferred_bytes,
                    "mbps": stats.mbps}

    figures = run(scenario())
    print("idle VM live migration over loopback (TCG):", figures)


def test_switchover_hook_refusing_resumes_the_source(work: Path) -> None:
    async def scenario() -> None:
        async with pair(work, guest_kernel(work)) as (src, dst):
            uri = await prepare_incoming(dst, "tcp:127.0.0.1:0", MigrationSettings())

            async def on_switchover() -> None:
                raise RuntimeError("the coordinator said no")

            with pytest.raises(MigrationError) as info:
                await run_live_migration(src, uri, MigrationSettings(), on_switchover)
            assert info.value.phase == "switchover"
            assert info.value.reason == "the coordinator said no"
            assert await src.status() == "running"
            with pytest.raises(MigrationError):
                await asyncio.wait_for(wait_incoming(dst), 10)
            assert await exits_soon(dst) != 0

    run(scenario())


def test_destination_killed_mid_migration(work: Path) -> None:
    settings = MigrationSettings(max_bandwidth_mib_s=2)

    async def scenario() -> None:
        async with pair(work, guest_kernel(work, dirty_mib=8), memory_mib=64) as (src, dst):
            uri = await prepare_incoming(dst, "tcp:127.0.0.1:0", settings)
            progress: list[Progress] = []

            async def killer() -> None:
                while not progress or progress[-1].transferred_bytes < 1 * MiB:
                    await asyncio.sleep(0.05)
                dst.kill()

            async def on_switchover() -> None:
                raise AssertionError("must not get this far")

            task = asyncio.create_task(killer())
            with pytest.raises(MigrationError) as info:
                await run_live_migration(src, uri, settings, on_switchover, on_progress=progress.append)
            await task
            assert info.value.phase == "transfer"
            assert await src.status() == "running"
            assert progress[-1].status == "active" and progress[-1].iteration == 1

    run(scenario())


def test_cancelled_migration_rolls_back(work: Path) -> None:
    """A caller's timeout cancels the migration task: QEMU's migration is cancelled too
    and the guest keeps running on the source."""
    settings = MigrationSettings(max_bandwidth_mib_s=2)

    async def scenario() -> None:
        async with pair(work, guest_kernel(work, dirty_mib=8), memory_mib=64) as (src, dst):
            uri = await prepare_incoming(dst, "tcp:127.0.0.1:0", settings)

            async def on_switchover() -> None:
                raise AssertionError("must not get this far")

            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await run_live_migration(src, uri, settings, on_switchover)
            assert (await src.execute("query-migrate"))["status"] == "cancelled"
            assert await src.status() == "running"
            assert await exits_soon(dst) != 0

    run(scenario())


def test_ladder_aborts_a_guest_dirtying_faster_than_the_cap(work: Path) -> None:
    # QEMU bumps the throttle at most every other >= 1 s period: give each step 3.5 s
    ladder = Ladder.from_config([
        {"action": "auto-converge", "initial_pct": 40, "increment_pct": 20},
        {"action": "postcopy"},
        {"action": "abort"},
    ], stall_iterations=5, stall_s=3.5)
    settings = MigrationSettings(max_bandwidth_mib_s=4, ladder=ladder, total_timeout_s=30)

    async def scenario() -> str:
        async with pair(work, guest_kernel(work, dirty_mib=4)) as (src, dst):
            uri = await prepare_incoming(dst, "tcp:127.0.0.1:0", settings)
            progress: list[Progress] = []

            async def on_switchover() -> None:
                raise AssertionError("must not get this far")

            t0 = time.monotonic()
            with pytest.raises(MigrationAborted) as info:
                await run_live_migration(src, uri, settings, on_switchover, on_progress=progress.append)
            took = time.monotonic() - t0
            reason = info.value.reason
            assert reason.startswith("did not converge after trying downtime 100 ms, "
                                     "auto-converge (CPU throttle 40% + 20% a pass): ")
            assert "postcopy" not in reason  # the VM does not allow it: skipped
            assert "the guest dirties" in reason and "the 4.0 MiB/s bandwidth cap" in reason
            assert took < 25
            # asleep until its step: at most QEMU's 1%
            assert all(p.cpu_throttle_pct <= 1 for p in progress if not any("throttling" in s for s in p.steps))
            params = await src.execute("query-migrate-parameters")
            assert (params["cpu-throttle-initial"], params["max-cpu-throttle"]) == (40, 99)
            # QEMU bumps the throttle only every other sync period of >= 1 s, so it may not
            # have yet; when it has, the first bump lands on the step's 40%
            woke = [p.cpu_throttle_pct for p in progress if p.cpu_throttle_pct > 1]
            assert not woke or woke[0] >= 40, woke
            assert await src.status() == "running"
            assert await exits_soon(dst) != 0
            return reason

    print("ladder abort:", run(scenario()))


@pytest.mark.parametrize("refuse", [False, True], ids=["completes", "hook-refuses"])
def test_ladder_switches_to_postcopy_when_allowed(work: Path, refuse: bool) -> None:
    """Post-copy also passes through pre-switchover: until the hook agrees, the source
    can still take the VM back."""
    ladder = Ladder.from_config([{"action": "downtime", "ms": 150}, {"action": "postcopy"}, {"action": "abort"}],
                                stall_iterations=2, stall_s=1.0)
    settings = MigrationSettings(max_bandwidth_mib_s=8, ladder=ladder, allow_postcopy=True, total_timeout_s=20)

    async def scenario() -> None:
        async with pair(work, guest_kernel(work, dirty_mib=4)) as (src, dst):
            uri = await prepare_incoming(dst, "tcp:127.0.0.1:0", settings)
            hooks = 0

            async def on_switchover() -> None:
                nonlocal hooks
                hooks += 1
                if refuse:
                    raise RuntimeError("not now")

            if refuse:
                with pytest.raises(MigrationError) as info:
                    await run_live_migration(src, uri, settings, on_switchover)
                assert info.value.phase == "switchover" and hooks == 1
                assert await src.status() == "running"
                assert await exits_soon(dst) != 0
                return
            incoming = asyncio.create_task(wait_incoming(dst))
            stats = await run_live_migration(src, uri, settings, on_switchover)
            await asyncio.wait_for(incoming, 10)
            assert stats.postcopy and hooks == 1
            assert len(stats.steps) == 2
            assert stats.steps[0].endswith("raising the downtime limit to 150 ms")
            assert stats.steps[1].endswith("switching to post-copy")
            assert await src.status() == "postmigrate"
            assert await dst.status() == "paused"
            await dst.cont()
            assert await dst.status() == "running"

    run(scenario())


def test_quick_migration_through_a_file(work: Path) -> None:
    state = work / "vm.state"

    async def scenario() -> None:
        async with pair(work, guest_kernel(work, b"SAVED-GUEST\n")) as (src, dst):
            stats = await save_state(src, save_command(str(state)))
            assert stats.stopped_at is not None and stats.transferred_bytes > 0
            assert await src.status() == "postmigrate"
            assert state.stat().st_size > 0
            await load_state(dst, load_command(str(state)))
            assert await dst.status() == "paused"
            await dst.cont()
            assert await dst.status() == "running"
            await dst.pmemsave(LOAD_ADDR, 4096, work / "restored.bin")
            assert b"SAVED-GUEST" in (work / "restored.bin").read_bytes()

    run(scenario())


def test_failed_save_resumes_the_guest(work: Path) -> None:
    async def scenario() -> None:
        async with pair(work, guest_kernel(work)) as (src, dst):
            with pytest.raises(MigrationError) as info:
                await save_state(src, "exec 0<&-; sleep 0.2; exit 1")
            assert info.value.phase == "save"
            assert await src.status() == "running"
            with pytest.raises(MigrationError) as info:
                await load_state(dst, load_command(str(work / "missing.state")), first_data_timeout_s=1)
            assert info.value.phase == "load"
            assert "No such file or directory" in str(info.value)

    run(scenario())


def test_settings_relations_are_checked() -> None:
    from shoal.vm.errors import MigrationConfigError

    with pytest.raises(MigrationConfigError, match="poll_interval_s .* < the ladder's stall_s"):
        MigrationSettings(total_timeout_s=10)  # the default ladder waits 30 s per stall
    with pytest.raises(MigrationConfigError, match="ladder step 1 sets the downtime limit to 200 ms, not above"):
        MigrationSettings(downtime_ms=300)
    with pytest.raises(MigrationConfigError, match="max_bandwidth_mib_s must be"):
        MigrationSettings(max_bandwidth_mib_s=0)
    with pytest.raises(MigrationConfigError, match="unknown migration setting"):
        MigrationSettings.from_config({"bandwidth": 10})
    s = MigrationSettings.from_config({"max_bandwidth_mib_s": 256, "ladder": [{"action": "abort"}], "stall_s": 5})
    assert s.ladder.stall_s == 5 and s.max_bandwidth_bytes_s == 256 * MiB
