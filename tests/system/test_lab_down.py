"""Done-when 7: ``shoal lab down`` leaves nothing behind, also after a crashed lab."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from shoal.lab import procs
from shoal.lab.lab import Lab
from tests.system.lab_helpers import leftovers, require_lab_tools, shoal, shoal_ok, wait_for


def test_down_after_killed_and_frozen_processes(tmp_path: Path) -> None:
    require_lab_tools()
    name = f"d{os.getpid() % 100000}"
    d = tmp_path / "lab"
    try:
        shoal_ok("lab", "up", "--nodes", "2", "--name", name, "--dir", str(d), timeout=120)
        st = Lab(d).load()
        status = json.loads(shoal_ok("lab", "status", "--dir", str(d), "--json"))
        assert status["storage_target"]["running"] and status["mode"] == "netns"
        assert {n: i["agent"] for n, i in status["nodes"].items()} == {"node1": "running", "node2": "running"}
        assert leftovers(name, d)  # the check below can fail: it sees a running lab
        # the storage target serves the LUN on the storage network, seen from a node
        info = shoal_ok("lab", "exec", "--dir", str(d), "node1", "--", "qemu-img", "info", "--output=json",
                        st.target)
        assert json.loads(info)["virtual-size"] == 4 << 30
        # ... and it is the lab's volume vol1, served by shoal's own NBD server
        with open(d / "lun0.img", "rb") as lun:
            assert lun.read(8) == b"SHOALVOL"
        assert status["storage_target"]["pid"] == st.target_pid and st.target_pid is not None
        assert b"serve" in Path(f"/proc/{st.target_pid}/cmdline").read_bytes().split(b"\0")
        # a crash: agents killed behind the lab's back, one frozen, lab.json lost
        os.kill(st.agents["node1"], signal.SIGKILL)
        os.killpg(st.agents["node2"], signal.SIGSTOP)
        wait_for(lambda: not procs.alive(st.agents["node1"]), 5, "node1's agent gone")
        (d / "lab.json").unlink()
        out = shoal_ok("lab", "down", "--dir", str(d), "--name", name)
        assert "removed 3 namespace(s)" in out, out
        assert leftovers(name, d) == []
        again = shoal("lab", "down", "--dir", str(d), "--name", name)
        assert again.returncode == 0 and "nothing to remove" in again.stdout
    finally:
        Lab(d).down(name)
    assert leftovers(name, d) == []
