"""Peer-to-peer transport: the ``Transport`` contract and its in-memory twin (``transport``), the libp2p implementation
(``p2p``, ``bridge``, ``libp2p_stream``, ``relay``), reachability checks (``dialback``) and multiaddrs (``addrs``)."""
