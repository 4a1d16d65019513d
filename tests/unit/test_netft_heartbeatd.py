"""The liveness process's receive path, driven by hand (no sockets)."""

from __future__ import annotations

from typing import Any

from shoal.config.timing import Timing
from shoal.netft.heartbeatd import Heartbeatd, Peer, Setup
from shoal.netft.links import LinkState
from shoal.netft.protocol import Heartbeat, derive_key, encode_heartbeat, network_tag

KEY = derive_key(b"k" * 32, "c", "heartbeat")


def daemon() -> tuple[Heartbeatd, list[dict[str, Any]]]:
    setup = Setup(cluster="c", node="a", node_id=1, key=KEY, port=3343, timing=Timing(),
                  addresses={"cluster": "198.18.1.1", "public": "198.18.2.1"},
                  peers=[Peer("b", 2, {"cluster": "198.18.1.2", "public": "198.18.2.2"})],
                  enabled={"cluster", "public"})
    d = Heartbeatd(setup, None)
    out: list[dict[str, Any]] = []
    d.emit = out.append  # type: ignore[method-assign]
    return d, out


def hb(seq: int, net: str = "cluster", key: bytes = KEY, receiver: int = 1, boot: int = 99) -> bytes:
    return encode_heartbeat(Heartbeat(2, receiver, network_tag(net), True, boot, seq), key)


def test_valid_heartbeats_bring_the_link_up_and_report_it() -> None:
    d, out = daemon()
    for seq in (1, 2, 3):
        d.on_datagram("cluster", hb(seq), "198.18.1.2")
    assert d.links[("b", "cluster")].state is LinkState.UP
    assert d.links[("b", "public")].state is LinkState.DOWN
    assert [(e["old"], e["new"]) for e in out if e["ev"] == "link"] == [("down", "joining"), ("joining", "up")]


def test_refusals_and_replays() -> None:
    d, out = daemon()
    d.on_datagram("cluster", hb(1, key=derive_key(b"x" * 32, "c", "heartbeat")), "198.18.1.2")
    d.on_datagram("public", hb(1, net="public"), "198.18.2.9")  # not b's address
    d.on_datagram("public", hb(1, net="cluster"), "198.18.2.2")  # wrong network tag
    refused = [e for e in out if e["ev"] == "refused"]
    assert [e["reason"] for e in refused] == [
        "bad authentication code", "b is not at 198.18.2.9 on public",
        "heartbeat addressed to another node or network"]
    assert refused[0]["claims"] == "b" and refused[0]["source"] == "198.18.1.2"
    d.on_datagram("cluster", hb(5), "198.18.1.2")
    d.on_datagram("cluster", hb(5), "198.18.1.2")  # replay: ignored
    d.on_datagram("cluster", hb(4), "198.18.1.2")
    assert d.links[("b", "cluster")].good_in_a_row == 1
    # the same bad source is logged once per 30 s, not per datagram
    n = len(out)
    d.on_datagram("cluster", hb(9, key=b"z" * 32), "198.18.1.2")
    assert len(out) == n


def test_blocked_network_drops_traffic() -> None:
    d, _ = daemon()
    d.s.blocked = {"cluster"}
    for seq in (1, 2, 3):
        d.on_datagram("cluster", hb(seq), "198.18.1.2")
    assert d.links[("b", "cluster")].state is LinkState.DOWN


def test_replays_from_two_boots_cannot_keep_a_link_up() -> None:
    d, _ = daemon()
    link = d.links[("b", "cluster")]
    d.on_datagram("cluster", hb(7, boot=1000), "198.18.1.2")  # old boot
    d.on_datagram("cluster", hb(3, boot=2000), "198.18.1.2")  # newer boot: accepted
    assert link.good_in_a_row == 2
    # captured heartbeats of both boots replayed alternately: all ignored
    for _ in range(3):
        d.on_datagram("cluster", hb(7, boot=1000), "198.18.1.2")
        d.on_datagram("cluster", hb(3, boot=2000), "198.18.1.2")
    assert link.good_in_a_row == 2
    assert d.last_seen_seq[(2, "cluster")] == (2000, 3)


def test_boot_id_is_ordered_by_start_time() -> None:
    d1, _ = daemon()
    d2, _ = daemon()
    assert d1.boot_id < d2.boot_id


def test_heartbeat_socket_is_not_shareable() -> None:
    import asyncio
    import socket

    async def run() -> None:
        setup = Setup(cluster="c", node="a", node_id=1, key=KEY, port=0, timing=Timing(),
                      addresses={"lo": "127.0.0.1"}, peers=[], enabled={"lo"})
        d = Heartbeatd(setup, None)
        await d.sync_sockets()
        try:
            sock = d.transports["lo"].get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
            port = sock.getsockname()[1]
            thief = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                try:
                    thief.bind(("127.0.0.1", port))
                    stolen = True
                except OSError:
                    stolen = False
            finally:
                thief.close()
            assert not stolen
        finally:
            for t in d.transports.values():
                t.close()

    asyncio.run(run())
