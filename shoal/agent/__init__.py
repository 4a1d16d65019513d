"""The node agent: one per node; wires cluster networks, membership and (later)
volumes and VMs together, and serves the local control socket the CLI uses."""
