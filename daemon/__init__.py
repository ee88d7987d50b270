"""The asyncio daemon `petald`: identity, libp2p host, Kademlia DHT, block server, router, control API."""
