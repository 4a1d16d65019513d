"""The agent's configuration order (pure), its connection pool after a cut-off call, and
how disk liveness feeds its membership."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from shoal.agent.agent import NodeAgent, config_order, is_newer
from shoal.config.cli import make_config, write_secret
from shoal.config.model import write_config
from shoal.membership import NodeState
from shoal.netft.links import LinkState

NETS_A = [{"name": "cluster", "subnet": "198.18.1.0/24", "role": "cluster", "metric": "auto"},
          {"name": "public", "subnet": "198.18.2.0/24", "role": "cluster-and-client", "metric": "auto"}]
NETS_B = [{"name": "cluster", "subnet": "198.18.1.0/24", "role": "cluster", "metric": 7},
          {"name": "public", "subnet": "198.18.2.0/24", "role": "cluster-and-client", "metric": "auto"}]


def test_same_generation_different_tables_settle_on_one_winner() -> None:
    a = {"generation": 5, "networks": NETS_A}
    b = {"generation": 5, "networks": NETS_B}
    # exactly one side adopts the other's table, whichever node compares
    assert is_newer(a, b) != is_newer(b, a)
    winner = a if is_newer(a, b) else b
    loser = b if winner is a else a
    assert is_newer(winner, loser) and not is_newer(loser, winner)
    assert not is_newer(winner, winner)  # equal: no churn
    # a higher generation still wins regardless of the table
    assert is_newer({"generation": 6, "networks": loser["networks"]}, winner)
    assert not is_newer({"generation": 4, "networks": winner["networks"]}, loser)


def test_config_order_is_canonical() -> None:
    # "auto" spelled as a missing metric is the same table
    same = [{k: v for k, v in d.items() if k != "metric"} for d in NETS_A]
    assert config_order(3, NETS_A) == config_order(3, same)
    assert config_order(3, NETS_A) != config_order(3, NETS_B)


def test_call_peer_replaces_a_connection_cut_off_mid_call(tmp_path: Path) -> None:
    cfg = make_config("pool", 2, run_dir=str(tmp_path / "run"), base="127.77.0.0")
    write_secret(tmp_path / "cluster.secret")
    write_config(cfg, tmp_path / "cluster.toml")

    async def main() -> None:
        a1 = NodeAgent(tmp_path / "cluster.toml", "node1")
        a2 = NodeAgent(tmp_path / "cluster.toml", "node2")
        release = asyncio.Event()

        async def handler(peer: str, op: str, args: dict[str, Any], payload: bytes) -> tuple[Any, bytes]:
            if op == "slow":
                await release.wait()
            return {"op": op}, b""

        a2.channel.handler = handler
        net = a1.enabled_networks()[0]
        await a2.channel.listen(net, a2.me.addresses[net], a2.cfg.rpc_port)
        for n in a1.metrics:
            a1.links[("node2", n)] = (LinkState.UP if n == net else LinkState.DOWN, None)
        try:
            try:
                async with asyncio.timeout(0.3):
                    await a1.call_peer("node2", "slow")
                raise AssertionError("the slow call should have timed out")
            except TimeoutError:
                pass
            release.set()
            assert ("node2", net) not in a1.conns  # the broken connection left the pool
            result, _, used = await a1.call_peer("node2", "fast")
            assert result == {"op": "fast"} and used == net
        finally:
            for c in a1.conns.values():
                c.close()
            a2.channel.close()

    asyncio.run(main())


def test_a_slot_judged_alive_counts_only_until_its_deadline(tmp_path: Path) -> None:
    """Disk liveness is a deadline, not the last judgement: a peer whose heartbeats stop
    after its slot was last seen changing long enough ago is ``down``, even when no
    volume has judged its slot since (a loaded machine runs the judge late)."""
    cfg = make_config("pool", 2, run_dir=str(tmp_path / "run"), base="127.77.0.0")
    write_secret(tmp_path / "cluster.secret")
    write_config(cfg, tmp_path / "cluster.toml")

    def links(agent: NodeAgent, state: LinkState) -> None:
        for n in agent.metrics:
            agent.links[("node2", n)] = (state, None)
        agent._reevaluate("node2")

    async def main() -> None:
        a1 = NodeAgent(tmp_path / "cluster.toml", "node1")
        links(a1, LinkState.UP)
        assert a1.membership.state("node2") is NodeState.UP
        a1.set_disk_alive("node2", time.monotonic() + 30)
        links(a1, LinkState.DOWN)
        assert a1.membership.state("node2") is NodeState.ISOLATED
        # the judge runs again with the same last change, now too old: down
        a1.set_disk_alive("node2", time.monotonic() - 0.01)
        assert a1.membership.state("node2") is NodeState.DOWN
        a1.set_disk_alive("node2", time.monotonic() + 30)  # it advances again
        assert a1.membership.state("node2") is NodeState.ISOLATED
        links(a1, LinkState.UP)
        # judged alive for a short while only; its heartbeats stop after that, before
        # any new judgement
        a1.set_disk_alive("node2", time.monotonic() + 0.05)
        await asyncio.sleep(0.1)
        links(a1, LinkState.DOWN)
        assert a1.membership.state("node2") is NodeState.DOWN
        # and a judgement with that same deadline changes nothing
        a1.set_disk_alive("node2", a1.disk_alive["node2"])
        assert a1.membership.state("node2") is NodeState.DOWN

    asyncio.run(main())
