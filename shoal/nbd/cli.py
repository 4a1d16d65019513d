"""``shoal nbd serve``: export the files of a volume (or one raw image) over NBD;
``shoal nbd path``: the URI of a shared-volume file on this node's agent.

    shoal nbd serve --volume IMG --socket SOCK [--listen HOST:PORT] [--read-only]
    shoal nbd serve --file RAW [--name NAME] --socket SOCK [--listen HOST:PORT]
    shoal nbd path VOLUME:/path

With ``--volume`` every regular file is an export named by its path
(``nbd+unix:///vm/disk0.raw?socket=SOCK``). ``--file`` serves a raw image or
block device as one export (default name: empty, the NBD default export).
The unix socket is created mode 0600. SIGINT/SIGTERM stop the server cleanly.
``--file`` also answers shoal's fencing options (register/preempt, docs/NBD.md), so it
can be a cluster's storage target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Mapping

from shoal.errors import UsageError
from shoal.nbd.backend import Backend, FileBackend
from shoal.nbd.server import NBDServer
from shoal.util import loop


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    nbd = subparsers.add_parser("nbd", help="serve volume files over NBD; the URI of a file on this node",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = nbd.add_subparsers(dest="nbd_command", metavar="ACTION")
    sub.required = True
    serve = sub.add_parser("serve", help="export a volume's files (or one raw image) over NBD")
    src = serve.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--volume", metavar="PATH", help="volume image or block device; one export per file"
    )
    src.add_argument(
        "--file", metavar="PATH", help="raw image or block device served as one export"
    )
    serve.add_argument("--name", default="", help="export name for --file (default: empty)")
    serve.add_argument(
        "--socket", metavar="SOCK", help="unix socket to listen on (created mode 0600)"
    )
    serve.add_argument("--listen", metavar="HOST:PORT", help="also listen on TCP")
    serve.add_argument("--read-only", action="store_true", help="refuse writes")
    serve.add_argument("--threads", type=int, default=4, help="I/O threads (default 4)")
    serve.set_defaults(handler=serve_command)

    from shoal.config import locate

    path = sub.add_parser("path", help="the NBD URI of a volume file on this node (for qemu-io, qemu-img, QEMU)")
    path.add_argument("target", metavar="VOLUME:/path")
    path.add_argument("--json", action="store_true")
    locate.add_arguments(path)
    path.set_defaults(handler=_path_command)


def _path_command(args: argparse.Namespace) -> int:
    from shoal.cli import online

    return online.cmd_nbd_path(args)


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r} is not HOST:PORT, for example 127.0.0.1:10809")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_command(args: argparse.Namespace) -> int:
    if not args.socket and not args.listen:
        raise UsageError("say where to listen: --socket PATH and/or --listen HOST:PORT")
    listen = _parse_listen(args.listen) if args.listen else None
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    with contextlib.ExitStack() as stack:
        backends: Mapping[str, Backend]
        if args.volume:
            from shoal.nbd.volume_backend import VolumeExports
            from shoal.volume import Volume

            volume = stack.enter_context(Volume.open(args.volume, writable=not args.read_only))
            backends = VolumeExports(volume, read_only=args.read_only)
        else:
            backend = FileBackend(args.file, read_only=args.read_only)
            stack.callback(backend.close)
            backends = {args.name: backend}
        loop.run(_serve(backends, args.socket, listen, args.threads))
    return 0


async def _serve(
    backends: Mapping[str, Backend], sock: str | None, listen: tuple[str, int] | None, threads: int
) -> None:
    server = NBDServer(backends, threads=threads)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if sock:
            await server.listen_unix(sock)
        if listen:
            port = await server.listen_tcp(*listen)
            print(f"shoal nbd: listening on {listen[0]}:{port}", file=sys.stderr)
        await stop.wait()  # listening servers accept connections by themselves
    finally:
        await server.close()
