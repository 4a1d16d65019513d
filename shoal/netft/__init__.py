"""Cluster networks in the manner of Windows NetFT.

Layers, bottom up (each imports only downward):

* ``routing``   pure: automatic metrics and the route (internal / live-migration)
                chosen from link states and metrics.
* ``protocol``  pure: heartbeat datagrams (encode/decode/authenticate) and the
                HMAC challenge of the agent-to-agent channel.
* ``links``     pure: the per (peer, network) link state machine with hysteresis,
                driven by heartbeats and a monotonic clock passed in.
* ``heartbeatd`` the liveness process: UDP sockets, timers, raised scheduling
                priority; reports link changes to the agent on a pipe.
* ``channel``   asyncio adapter: authenticated request/response between agents.
"""
