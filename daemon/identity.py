"""Node identity: one ed25519 key in the state dir, from which the libp2p peer id and the DHT node id derive.

libp2p is imported lazily, inside the two methods that need it: it is slow to import, and most commands
(config checks, the DHT id, signing records) need none of it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from nacl.signing import SigningKey

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

KEY_FILE = "identity.key"
SEED_BYTES = 32


class IdentityError(RuntimeError):
    """The key file exists but cannot be used."""


@dataclass(frozen=True)
class Identity:
    """An ed25519 key. The seed never leaves this object except to build the libp2p key pair."""

    seed: bytes

    @classmethod
    def generate(cls) -> Identity:
        return cls(bytes(SigningKey.generate()))

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str]) -> Identity:
        """Read `identity.key` from the state dir, creating it (mode 0600) on first start."""
        path = Path(state_dir) / KEY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            seed = path.read_bytes()
            if len(seed) != SEED_BYTES:
                raise IdentityError(
                    f"{path} holds {len(seed)} bytes, expected a {SEED_BYTES}-byte ed25519 seed; "
                    "move it away to let petald create a new identity"
                ) from None
            return cls(seed)
        identity = cls.generate()
        with os.fdopen(fd, "wb") as f:
            f.write(identity.seed)
        return identity

    @cached_property
    def _signing_key(self) -> SigningKey:
        return SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte ed25519 public key, as it appears in signed DHT records."""
        return bytes(self._signing_key.verify_key)

    def sign(self, data: bytes) -> bytes:
        """A detached 64-byte ed25519 signature."""
        return self._signing_key.sign(data).signature

    @cached_property
    def dht_node_id(self) -> bytes:
        """Kademlia's 160-bit node id: SHA-1 of the public key, stable across restarts."""
        return hashlib.sha1(self.public_key).digest()

    def libp2p_key_pair(self) -> KeyPair:
        """The same key as libp2p's key pair (for the host's Noise handshake and peer id)."""
        from libp2p.crypto.ed25519 import Ed25519PrivateKey
        from libp2p.crypto.keys import KeyPair

        private = Ed25519PrivateKey.new(self.seed)
        return KeyPair(private, private.get_public_key())

    @cached_property
    def peer_id(self) -> str:
        """The libp2p peer id (base58), derived from the same key."""
        from libp2p.peer.id import ID

        return ID.from_pubkey(self.libp2p_key_pair().public_key).to_base58()
