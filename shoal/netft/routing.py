"""Metrics and routes, as pure functions.

Automatic metrics follow Windows Server 2008 R2: cluster-only networks (no
default gateway, in Windows' terms) get 1000, 1100, 1200 …, cluster-and-client
networks 10000, 10100 …, each in declaration order. A metric pinned by hand
wins; automatic values skip metrics that are pinned. Networks with role
``none`` have no metric and carry nothing.

Route between two nodes: *internal* traffic takes the lowest-metric network
whose link between them is up; *live migration* takes the second-lowest up
network, so it never shares the internal network, and falls back to the
internal one only when a single network is up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shoal.config.model import Network, Role

AUTO_BASE = {Role.CLUSTER: 1000, Role.CLUSTER_AND_CLIENT: 10000}
AUTO_STEP = 100


@dataclass(frozen=True)
class Metric:
    value: int
    auto: bool


def assign_metrics(networks: Iterable[Network]) -> dict[str, Metric]:
    """Metric of every cluster-enabled network; role-none networks are absent."""
    nets = [n for n in networks if n.role.carries_cluster_traffic]
    pinned = {n.metric for n in nets if n.metric is not None}
    out: dict[str, Metric] = {}
    next_value = dict(AUTO_BASE)
    for n in nets:
        if n.metric is not None:
            out[n.name] = Metric(n.metric, auto=False)
            continue
        v = next_value[n.role]
        while v in pinned:
            v += AUTO_STEP
        out[n.name] = Metric(v, auto=True)
        next_value[n.role] = v + AUTO_STEP
    return out


@dataclass(frozen=True)
class Route:
    internal: str | None
    migration: str | None

    def to_dict(self) -> dict[str, str | None]:
        return {"internal": self.internal, "migration": self.migration}


def order_by_metric(metrics: Mapping[str, Metric]) -> list[str]:
    return sorted(metrics, key=lambda name: (metrics[name].value, name))


def choose_route(metrics: Mapping[str, Metric], up: Mapping[str, bool]) -> Route:
    """Route between two nodes given which networks' links between them are up."""
    usable = [n for n in order_by_metric(metrics) if up.get(n, False)]
    if not usable:
        return Route(None, None)
    migration = usable[1] if len(usable) > 1 else usable[0]
    return Route(usable[0], migration)


def failover_order(metrics: Mapping[str, Metric], up: Mapping[str, bool]) -> list[str]:
    """Networks to try for internal traffic, best first: up links, then the rest.

    Links not (yet) up come last so a request can still get through on a link
    NetFT has not judged yet (e.g. just after start).
    """
    ordered = order_by_metric(metrics)
    return [n for n in ordered if up.get(n, False)] + [n for n in ordered if not up.get(n, False)]
