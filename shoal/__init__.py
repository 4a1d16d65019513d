"""shoal: Cluster Shared Volumes, NetFT cluster networking and live migration for QEMU hosts.

Packages, bottom to top (each imports only the ones above it in this list):

- ``shoal.errors``  the root exception every package's errors derive from
- ``shoal.util``    small helpers with no shoal dependencies (sizes, progress bars)
- ``shoal.volume``  the shared volume: on-disk format, journal, leases, fsck, defrag
- ``shoal.nbd``     the NBD protocol (sans-I/O), server and client
- ``shoal.cli``     the ``shoal`` command, which wires the packages together
"""

__version__ = "0.1.0"
