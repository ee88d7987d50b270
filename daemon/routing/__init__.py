"""Client-side routing and inference sessions: how a daemon runs blocks it does not host on the swarm's servers.

``swarm`` reads who serves what from the DHT, ``chains`` chooses routes (pure), ``bans`` remembers failed servers,
``router`` ties them together with latency probes, ``remote`` is the client of one server's block RPCs, ``session``
is the client-side inference session (failover, replay, push) and ``calls`` runs forward/backward with retries.
"""
