"""VMs on shared volumes: the QEMU driver, test guests, live and quick migration.

See docs/VMS.md. The agent wires these into cluster behaviour (``shoal.agent.vms``).
"""
