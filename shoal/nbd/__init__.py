"""The NBD data path: the server VMs and tools attach to, and the client the node
agent uses as its storage path to a LUN served over the network.

Wire format byte by byte, and how to run ``shoal nbd serve``: docs/NBD.md.

Layers, bottom up (each imports only downward; the sans-I/O layers do no I/O,
take no timeouts and can be fuzzed without sockets, like h11):

- ``errors``            the package's exception tree (remote vs local faults)
- ``constants``, ``wire``  protocol numbers and fixed-layout structs
- ``backend``           :class:`Backend`, :class:`AsyncBackend`, :class:`ExportResolver`
                        ABCs and :class:`FileBackend`
- ``fencing``           sans-I/O REGISTER/PREEMPT payloads and the floor table
- ``server_handshake``  sans-I/O fixed-newstyle negotiation, server side
- ``client_handshake``  sans-I/O negotiation, client side
- ``requests``          sans-I/O request parsing and validation (server)
- ``replies``           sans-I/O reply encoding (server) and parsing (client)
- ``server_connection`` asyncio adapter: one connection (BufferedProtocol)
- ``server``            asyncio adapter: :class:`NBDServer`, listening, fencing
- ``client``            asyncio adapter: :class:`NBDClient`, :func:`preempt`
- ``volume_backend``    exports of a shoal volume (the only module that knows it)
- ``cli``               ``shoal nbd serve``

The server serves a mapping export-name -> backend, or asks an
:class:`ExportResolver`, and knows nothing else; the node agent supplies its own
(async) backends and resolver.
"""

from shoal.nbd.backend import AsyncBackend, Backend, BlockSizes, ExportResolver, FileBackend
from shoal.nbd.client import ClientSettings, NBDClient, list_exports, preempt
from shoal.nbd.errors import FencingUnsupported, NBDError, NBDFenced
from shoal.nbd.server import NBDServer

__all__ = [
    "AsyncBackend",
    "Backend",
    "BlockSizes",
    "ClientSettings",
    "ExportResolver",
    "FencingUnsupported",
    "FileBackend",
    "NBDClient",
    "NBDError",
    "NBDFenced",
    "NBDServer",
    "list_exports",
    "preempt",
]
