"""The coordinator of a shared volume, and the node side of its metadata service.

- ``election``  who is coordinator: liveness renewal, slot watching, the coordinator
                lease (delta leases) and the guard every metadata write passes
- ``messages``  pure: the one table of wire error codes, map encoding, argument checks
- ``metadata``  the coordinator's metadata service over an open ``Volume``: open/map,
                allocate, create, mkdir, remove, rename, resize, list, stat, trim, zero;
                revokes other nodes' cached maps before any units move or are freed
- ``maps``      a node's cache of extent maps, the ``using`` guard its data path holds
                while it does direct I/O, and the acknowledgement of revocations

Transport-agnostic: the agent wires ``MetadataService.handle`` and ``MapCache``'s
``call`` to the authenticated channel. Imports ``shoal.volume``; nothing below imports
this package.
"""
