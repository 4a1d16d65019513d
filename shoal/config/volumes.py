"""Shared volumes in the configuration: ``[[volume]]`` tables and LUN locations.

A volume is declared once for the whole cluster::

    [[volume]]
    name = "vol1"                                  # 1-64 of A-Z a-z 0-9 - _
    lun = "nbd://198.18.4.250:10809/lun0"          # how nodes reach the LUN ...
    paths = { node3 = "/dev/mapper/san-lun0" }     # ... unless a node has its own path

A LUN location is one of

* ``nbd://HOST[:PORT]/EXPORT`` — an NBD export on the network; HOST is an IPv4
  address (no name lookups on the storage path), PORT defaults to 10809 (the
  IANA NBD port), EXPORT may be empty (the server's default export);
* an absolute path of a file or block device, e.g. ``/dev/sdb`` or
  ``/srv/lun0.img``. Whether it exists is not checked here: the file is shared by
  every node, and each node sees its own devices.

The same volume may be reached differently from different nodes (one over the
SAN's multipath device, another over NBD); ``paths`` maps a node's name to its
own location and :meth:`VolumeConfig.url_for` picks it.

Nothing here opens a LUN; this module only says what the file means.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

NBD_SCHEME = "nbd://"
NBD_DEFAULT_PORT = 10809
MAX_EXPORT_BYTES = 4096  # the NBD protocol's limit on an export name
_VOLUME_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_VOLUME_KEYS = ("name", "lun", "paths")


@dataclass(frozen=True)
class Lun:
    """A parsed LUN location: an NBD export (host, port, export) or a local path."""

    url: str
    host: str | None = None
    port: int | None = None
    export: str | None = None
    path: str | None = None

    @property
    def is_nbd(self) -> bool:
        return self.host is not None


def parse_lun(url: str) -> Lun:
    """Parse a LUN location; raises ``ValueError`` whose text completes
    "… which is not usable: <text>." for a user."""
    if not isinstance(url, str) or not url:
        raise ValueError("give nbd://HOST:PORT/EXPORT or an absolute path")
    if not url.isprintable():
        raise ValueError("it contains unprintable characters")
    if url.startswith(NBD_SCHEME):
        return _parse_nbd(url)
    if url.startswith("/"):
        if url.rstrip("/") == "":
            raise ValueError("'/' is a directory, not a file or block device")
        return Lun(url, path=url)
    raise ValueError("it is neither nbd://HOST:PORT/EXPORT nor an absolute path of a file or block device")


def _parse_nbd(url: str) -> Lun:
    rest = url[len(NBD_SCHEME) :]
    hostport, slash, export = rest.partition("/")
    if not slash:
        raise ValueError("an NBD location needs the export after the address, e.g. nbd://10.0.0.5:10809/lun0")
    host, colon, port_text = hostport.partition(":")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"the NBD host {host!r} is not an IPv4 address") from None
    port = NBD_DEFAULT_PORT
    if colon:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"the NBD port {port_text!r} is not a number between 1 and 65535")
        port = int(port_text)
    if "?" in export or "#" in export:
        raise ValueError("an NBD export name here takes no query (?…) or fragment (#…)")
    if len(export.encode()) > MAX_EXPORT_BYTES:
        raise ValueError(f"the NBD export name is longer than {MAX_EXPORT_BYTES} bytes")
    return Lun(url, host=host, port=port, export=export)


@dataclass(frozen=True)
class VolumeConfig:
    """One ``[[volume]]``. ``path_overrides`` keeps the per-node locations as
    (node, url) pairs in declaration order, so the object stays hashable;
    :attr:`paths` gives them as a dict."""

    name: str
    lun: str
    path_overrides: tuple[tuple[str, str], ...] = ()

    @property
    def paths(self) -> dict[str, str]:
        return dict(self.path_overrides)

    def url_for(self, node: str) -> str:
        """Where ``node`` finds this volume's LUN: its own path, else the shared one."""
        return self.paths.get(node, self.lun)

    def lun_for(self, node: str) -> Lun:
        return parse_lun(self.url_for(node))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "lun": self.lun}
        if self.path_overrides:
            out["paths"] = self.paths
        return out


def parse_volumes(raw: Any, node_names: set[str], problems: list[str]) -> tuple[VolumeConfig, ...]:
    """The ``[[volume]]`` array; every problem is appended as one sentence."""
    if not isinstance(raw, list):
        problems.append("[[volume]] must be an array of tables, each with a name and a lun.")
        return ()
    out: list[VolumeConfig] = []
    for i, item in enumerate(raw, 1):
        vol = _parse_volume(i, item, node_names, problems)
        if vol is not None:
            out.append(vol)
    names = [v.name for v in out]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"volume {dup!r} is declared more than once; each volume needs its own name.")
    return tuple(out)


def _parse_volume(i: int, item: Any, node_names: set[str], problems: list[str]) -> VolumeConfig | None:
    if not isinstance(item, dict):
        problems.append(f"[[volume]] number {i} is not a table.")
        return None
    for key in item:
        if key not in _VOLUME_KEYS:
            problems.append(
                f"volume number {i} has an unknown key {key!r}; known keys are {', '.join(_VOLUME_KEYS)}."
            )
    name = item.get("name")
    if not isinstance(name, str) or not _VOLUME_NAME.fullmatch(name):
        problems.append(
            f"volume number {i} has name {name!r}; a volume name is 1 to 64 letters, digits, "
            "dashes or underscores."
        )
        return None
    ok = True
    lun = item.get("lun")
    if lun is None:
        problems.append(f"volume {name!r} has no lun; give lun = \"nbd://HOST:PORT/EXPORT\" or a device path.")
        ok = False
    else:
        ok = _check_lun(f"volume {name!r} has lun {lun!r}", lun, problems) and ok
    raw_paths = item.get("paths", {})
    pairs: list[tuple[str, str]] = []
    if not isinstance(raw_paths, dict):
        problems.append(f"volume {name!r}: paths must be a table of node = location, e.g. {{ node1 = \"/dev/sdb\" }}.")
        ok = False
    else:
        for node, url in raw_paths.items():
            if node not in node_names:
                problems.append(
                    f"volume {name!r} has a path for node {node!r}, which is not declared; its nodes are "
                    f"{', '.join(sorted(node_names)) or 'none'}."
                )
                ok = False
            ok = _check_lun(f"volume {name!r} has path {url!r} for node {node!r}", url, problems) and ok
            pairs.append((str(node), str(url)))
    if not ok:
        return None
    return VolumeConfig(name, str(lun), tuple(pairs))


def _check_lun(what: str, url: Any, problems: list[str]) -> bool:
    if not isinstance(url, str):
        problems.append(f"{what}, which is not a location in quotes.")
        return False
    try:
        parse_lun(url)
    except ValueError as err:
        problems.append(f"{what}, which is not usable: {err}.")
        return False
    return True
