"""The swarm's DHT: the ``SwarmDHT`` contract (``interface``), the Kademlia node over UDP (``network``, ``rpc``,
``storage``, ``signer``) and its in-memory twin for tests (``memory``)."""
