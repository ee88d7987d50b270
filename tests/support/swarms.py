"""Client-side swarms for session tests: block servers in one process (``LocalSwarm``) and the client half of a
daemon joined to real petald processes (``Client``), plus the tiny model's client-side embed and head."""

from __future__ import annotations

import torch

from petal.daemon.dht.memory import MemoryDHT, MemorySwarm
from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.transport import MemoryNetwork, MemoryTransport
from petal.daemon.routing.router import Router
from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.settings import DEFAULT_SETTINGS, ServeSettings
from petal.kernels.span import Span

MODEL = "tiny"
"""The model name LocalSwarm's servers announce."""
N = 6
"""Blocks of the model LocalSwarm's servers announce (the tests' tiny_llama(num_hidden_layers=N))."""


class LocalSwarm:
    """Block servers on one MemoryNetwork, each with its own node of one in-memory DHT (no UDP ports); a client
    Router on the same network and DHT.

    A server "dies" by stopping its transport: every open stream resets, as when the process is killed, while its
    DHT entry lingers (as after SIGKILL).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.net = MemoryNetwork()
        self.servers: dict[str, tuple[BlockServer, MemoryTransport, MemoryDHT]] = {}
        self.dht_swarm = MemorySwarm()
        self.client_id = Identity.generate()
        self.client_dht = MemoryDHT(self.client_id, self.dht_swarm)
        self.client_transport = MemoryTransport(self.net, self.client_id.peer_id)
        self.router: Router | None = None

    async def start(self) -> None:
        await self.client_dht.start()
        await self.client_transport.start()
        self.router = Router(self.client_transport, self.client_dht, max_age=0.0, max_stale=0.0, probe_timeout=2.0)

    async def add(
        self, start: int, end: int, throughput: float = 100.0, settings: ServeSettings = DEFAULT_SETTINGS
    ) -> str:
        ident = Identity.generate()
        transport = MemoryTransport(self.net, ident.peer_id)
        await transport.start()
        dht = MemoryDHT(ident, self.dht_swarm)
        await dht.start()
        server = BlockServer(
            Span.from_model(self.model, start, end),
            model=MODEL,
            fingerprint="FP",
            family="llama",
            num_blocks=N,
            transport=transport,
            announce=lambda k, v, dht=dht: dht.announce(k, v, ttl=120),
            throughput=throughput,
            settings=settings,
        )
        await server.start()
        self.servers[ident.peer_id] = (server, transport, dht)
        return ident.peer_id

    async def kill(self, peer_id: str) -> None:
        """Crash-like: streams reset, nothing withdrawn from the DHT."""
        server, transport, dht = self.servers.pop(peer_id)
        await transport.stop()
        server._announce = server._withdraw = None
        await server.stop()
        await dht.stop()

    async def close(self) -> None:
        for peer in list(self.servers):
            await self.kill(peer)
        if self.router:
            await self.router.close()
        await self.client_transport.stop()
        await self.client_dht.stop()


def embed(model, ids):
    return model.model.embed_tokens(ids)


def logits(model, hidden):
    return model.lm_head(model.model.norm(hidden))


class Client:
    """The client half of a daemon, in the test process: transport, DHT node and router."""

    async def start(self, boot_dht_port: int) -> Client:
        self.identity = Identity.generate()
        self.transport = Libp2pTransport(self.identity)
        await self.transport.start()
        self.dht = DHT(self.identity, host="127.0.0.1", port=0)
        await self.dht.start([("127.0.0.1", boot_dht_port)])
        self.router = Router(self.transport, self.dht, max_age=0.0, max_stale=0.0)
        return self

    async def stop(self) -> None:
        await self.router.close()
        await self.dht.stop()
        await self.transport.stop()
