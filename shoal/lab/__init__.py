"""The one-machine lab: N hosts as network namespaces, real links and faults.

See docs/LAB.md for the layout. ``netns`` wraps iproute2, ``procs`` finds and
signals process groups, ``lab`` builds, inspects, breaks and removes a lab.
"""
