"""Automatic metrics and route choice (pure functions)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as hs

from shoal.config.model import Network, Role
from shoal.netft.routing import Metric, assign_metrics, choose_route, failover_order


def net(name: str, role: Role, metric: int | None = None, k: int = 1) -> Network:
    return Network(name, ipaddress.ip_network(f"198.18.{k}.0/24"), role, metric)


LAB = [net("cluster", Role.CLUSTER, k=1), net("public", Role.CLUSTER_AND_CLIENT, k=2),
       net("migration", Role.CLUSTER, k=3), net("storage", Role.NONE, k=4)]


def test_windows_2008r2_auto_metrics() -> None:
    m = assign_metrics(LAB)
    assert {k: (v.value, v.auto) for k, v in m.items()} == {
        "cluster": (1000, True), "public": (10000, True), "migration": (1100, True)}
    more = assign_metrics([*LAB, net("c2", Role.CLUSTER_AND_CLIENT, k=5), net("c3", Role.CLUSTER, k=6)])
    assert more["c2"].value == 10100 and more["c3"].value == 1200


def test_pinned_metric_wins_and_auto_skips_it() -> None:
    m = assign_metrics([net("a", Role.CLUSTER, 1000, 1), net("b", Role.CLUSTER, k=2),
                        net("c", Role.CLUSTER_AND_CLIENT, 50, 3)])
    assert m == {"a": Metric(1000, False), "b": Metric(1100, True), "c": Metric(50, False)}
    assert choose_route(m, {"a": True, "b": True, "c": True}).internal == "c"


def test_routes_and_failover() -> None:
    m = assign_metrics(LAB)
    all_up = {"cluster": True, "public": True, "migration": True}
    r = choose_route(m, all_up)
    assert (r.internal, r.migration) == ("cluster", "migration")
    r = choose_route(m, {**all_up, "cluster": False})
    assert (r.internal, r.migration) == ("migration", "public")
    r = choose_route(m, {"public": True})
    assert (r.internal, r.migration) == ("public", "public")
    assert choose_route(m, {}).internal is None
    assert failover_order(m, {**all_up, "cluster": False}) == ["migration", "public", "cluster"]


def test_role_none_moves_migration_to_public() -> None:
    nets = [n if n.name != "migration" else net("migration", Role.NONE, k=3) for n in LAB]
    m = assign_metrics(nets)
    assert "migration" not in m
    r = choose_route(m, {"cluster": True, "public": True, "migration": True})
    assert (r.internal, r.migration) == ("cluster", "public")


@given(hs.lists(hs.tuples(hs.sampled_from(list(Role)), hs.one_of(hs.none(), hs.integers(1, 20000)),
                          hs.booleans()), min_size=1, max_size=8, unique_by=lambda t: t[1] or -1))
def test_route_invariants(specs: list[tuple[Role, int | None, bool]]) -> None:
    nets = [net(f"n{i}", role, metric, i) for i, (role, metric, _) in enumerate(specs)]
    m = assign_metrics(nets)
    up = {f"n{i}": u for i, (_, _, u) in enumerate(specs)}
    assert len({v.value for v in m.values()}) == len(m)  # never two networks with one metric
    r = choose_route(m, up)
    usable = [n for n in m if up[n]]
    if not usable:
        assert r.internal is None and r.migration is None
        return
    assert r.internal == min(usable, key=lambda n: m[n].value)
    assert r.migration is not None and up[r.migration]
    if len(usable) > 1:
        assert r.migration != r.internal
        assert all(m[n].value >= m[r.migration].value for n in usable if n != r.internal)
