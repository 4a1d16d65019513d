"""The one-machine lab: N hosts as network namespaces, real links and faults.

See docs/LAB.md for the layout. ``netns`` wraps iproute2, ``procs`` finds and
signals process groups, ``lab`` builds, inspects, breaks and removes a lab,
``hold`` queues a node's outgoing packets on one link until release (run inside
the node's namespace), ``probe`` waits for the storage target, ``load`` makes
bounded load.
"""
