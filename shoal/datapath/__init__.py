"""The node's data path to a shared volume: its storage path to the LUN, direct and
redirected block I/O, and the NBD backend that serves a volume's files to local clients.

    lun        StoragePath: this node's registered NBD connections to the LUN
    device     LunDevice: the blocking Device interface over any async block I/O
    states     per-volume per-node states (direct, redirected, paused, unavailable)
    router     BlockRouter: direct when the path works, else through the coordinator
    backend    FileExports / FileBackend: one NBD export per volume file, using maps
"""
