"""The shared volume: the on-disk format, its journal and leases, and offline tools.

The byte-level format is docs/FORMAT.md. Modules, bottom up:

- ``errors``     the package's exception tree
- ``device``     positional I/O on the LUN (file or block device)
- ``layout``     geometry and the superblock
- ``lease``      coordinator lease and liveness slots; the offline tools' lease
- ``ops``        journal operations and their encoding
- ``extents``    a file's extent map
- ``meta``       the metadata in memory; the one ``apply`` that changes it
- ``checkpoint`` whole-metadata images in two slots
- ``journal``    records, group commit, replay scan
- ``volume``     the API: :class:`Volume` and :class:`VolumeFile`
- ``format``, ``fsck``, ``defrag``, ``transfer``   the tools built on it
- ``cli``        ``shoal volume …`` and ``shoal file …``
"""

from shoal.volume.errors import VolumeError
from shoal.volume.format import format_volume
from shoal.volume.layout import Superblock
from shoal.volume.volume import Stat, Volume, VolumeFile

__all__ = ["Stat", "Superblock", "Volume", "VolumeError", "VolumeFile", "format_volume"]
