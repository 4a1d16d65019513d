"""The coordinator of a shared volume: election by disk leases (``election``).

Later: the metadata service, map revocation, maintenance mode. Imports ``shoal.volume``;
nothing below imports this package.
"""
