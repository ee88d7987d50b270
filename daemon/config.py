"""petald settings: defaults, a TOML file, then command-line flags, in that order of precedence."""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from petal.protocol.adapters import adapter_entries
from petal.protocol.records import RecordError, check_public_name

DEFAULT_PORT = 31330
CODEC_CHOICES = ("auto", "none", "float16", "bfloat16", "q8")
"""``--codec`` values: petal.protocol.messages.CODEC_CHOICES (not imported: it loads torch, and config loads first)."""


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which setting and what to do."""


def system_mode() -> bool:
    """A system daemon (under systemd with StateDirectory=, or run as root) keeps state in /var/lib and /run."""
    return bool(os.environ.get("STATE_DIRECTORY")) or os.geteuid() == 0


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if system_mode():
        return Path("/var/lib/petal")
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "petal"


def default_socket() -> Path:
    """Where petald listens and petalctl looks: the same rule on both sides (see petal.ctl.client)."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "petald.sock"
    if system_mode():
        return Path("/run/petal/petald.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "petal" / "petald.sock"
    return Path(f"/tmp/petal-{os.getuid()}") / "petald.sock"


def parse_http_address(address: str) -> tuple[str, int]:
    """``--http HOST:PORT`` as (host, port); an IPv6 host in brackets (``[::1]:8080``) comes back without them."""
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not sep or not host or (":" in host and not bracketed) or not port.isdigit():
        raise ConfigError(
            f"--http {address!r}: use HOST:PORT, e.g. 127.0.0.1:8080 (an IPv6 host in brackets: [::1]:8080)"
        )
    if not 0 < int(port) < 65536:
        raise ConfigError(f"--http {address!r}: {port} is not a port number")
    return host, int(port)


def prepare_socket_dir(socket: Path) -> Path:
    """Create the socket's directory (0700; 0750 for a system daemon, whose group may use the socket) or check the
    one that is there: it must be a real directory (not a symlink), owned by this user, and writable by nobody else,
    or another user could replace the socket and answer in the daemon's name. Returns the directory.
    """
    directory = socket.parent
    mode = 0o750 if system_mode() else 0o700
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(directory, mode)
        os.chmod(directory, mode, follow_symlinks=False)  # the umask may have taken bits away; never widen a link
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigError(f"cannot create the socket dir {directory} ({e.strerror}); pass --socket elsewhere") from None
    try:
        st = os.lstat(directory)
    except OSError as e:
        raise ConfigError(
            f"cannot inspect the socket dir {directory} ({e.strerror}); pass --socket elsewhere"
        ) from None
    hint = f"remove it if it is not yours (e.g. `sudo rm -r {directory}`) or pass --socket in a directory only you own"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"socket dir {directory} is not a directory (a symlink or a file): {hint}")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"socket dir {directory} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}), who could "
            f"replace the socket: {hint}"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"socket dir {directory} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}), who could replace "
            f"the socket: `chmod go-w {directory}`, or pass --socket in a directory only you can write"
        )
    return directory


@dataclass
class Config:
    state_dir: Path = field(default_factory=default_state_dir)
    socket: Path = field(default_factory=default_socket)
    listen: list[str] = field(default_factory=lambda: [f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"])
    dht_port: int | None = None  # None: the same number as the libp2p TCP port (UDP and TCP ports do not collide)
    initial_peers: list[str] = field(default_factory=list)
    new_swarm: bool = False
    log_level: str = "info"
    http: str | None = None  # optional "127.0.0.1:PORT" serving the control API over TCP too
    announce_ttl: float = 120.0  # seconds a DHT entry lives; re-announced at a third of it
    relay: bool = True  # relay for unreachable peers when reachable; reserve on the bootstrap peer when not
    # direct data plane (petal.daemon.net.direct): block traffic over TLS/TCP on this "HOST:PORT" (port 0: any free
    # one; it is announced in the DHT) to peers that announce one too, libp2p otherwise. "auto": the first --listen
    # address's host, its TCP port + 1 (any free port when that is 0); "off" (or None): libp2p only
    direct: str | None = "auto"
    # block serving (see petal.daemon.serving): each `serve` entry is a model name in the models dir, a model dir path
    # or a .gguf file, optionally with its own blocks "MODEL:A:B"; several entries: several spans (of several models,
    # or disjoint spans of one), each its own block server
    serve: list[str] = field(default_factory=list)
    blocks: str | None = None  # "A:B": host blocks [A, B) of entries without their own; default: all, or num_blocks
    num_blocks: int | None = None  # host this many blocks where the swarm's throughput is worst
    # LoRA adapters served with every span served at start: PEFT dirs, "DIR" (named after the dir) or "NAME=DIR"
    adapters: list[str] = field(default_factory=list)
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 | float16
    quant: str = "none"  # none | int8 (weights)
    max_cache_tokens: int | None = None  # KV budget in tokens x blocks, reserved at start [4096 x hosted blocks]
    # MiB of training activations a server keeps from a forward for its backward [max(KV budget / 4, 1024)]; 0: none
    activation_budget_mb: int | None = None
    max_batch: int = 8
    max_length: int = 4096  # longest inference session (tokens) and forward sequence
    # continuous batching: token rows (batch x tokens, summed) of concurrent sessions' steps, or of forward/backward
    # calls, one server batch may hold; 0 or 1: off (every request runs alone)
    max_batch_tokens: int = 1024
    # a server with one open inference session runs its decode steps on the event loop (no thread hand-off per hop)
    inline_steps: bool = True
    # wire codec of this daemon's requests and the servers' replies to them: auto | none | float16 | bfloat16 | q8;
    # auto: none (exact) per hop, q8 where the link to that server was measured below slow_link_mbit
    codec: str = "auto"
    slow_link_mbit: float = 100.0
    alloc_timeout: float = 10.0  # seconds a session waits for KV budget before "busy"
    rebalance_period: float = 60.0  # with num_blocks: how often (± jitter) to check whether moving would help
    # trust (petal.daemon.routing.spotcheck): fraction of hops of this daemon's requests re-run on a second server
    # (or on its own blocks) and compared; 0 disables
    spot_check_rate: float = 0.01
    # this daemon's forwards of several rows, and long session steps (a prompt's prefill), run as a pipeline of
    # micro-batches of at least this many tokens, so a chain's servers compute at the same time
    # (petal.daemon.routing.chains.pipeline_parts, prefill_parts); 0: one batch, in turn
    pipeline_min_tokens: int = 128
    # TEST ONLY: served spans add noise of this relative size to their output (a "lying" server for tests of spot
    # checks); refused unless PETAL_TEST_ONLY=1 is in the environment. 0: off (the default)
    test_lie: float = 0.0
    public_name: str | None = None  # shown beside this daemon's servers in records, dashboards and `petalctl swarm`

    def validate(self) -> Config:
        if not self.new_swarm and not self.initial_peers:
            raise ConfigError(
                "no swarm to join: pass --initial-peer MULTIADDR (an address printed by a running petald) "
                "to join a swarm, or --new-swarm to start one"
            )
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise ConfigError(f"--log-level {self.log_level!r}: use debug, info, warning or error")
        if self.dht_port is not None and not 0 <= self.dht_port < 65536:
            raise ConfigError(f"--dht-port {self.dht_port} is not a port number")
        if self.http is not None:
            parse_http_address(self.http)
        if self.direct not in (None, "auto", "off"):
            host, sep, port = self.direct.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(
                    f"--direct {self.direct!r}: use HOST:PORT, e.g. 0.0.0.0:31331 (port 0: any free port), auto or off"
                )
        if self.announce_ttl < 3:
            raise ConfigError("announce_ttl must be at least 3 seconds")
        if self.codec not in CODEC_CHOICES:
            raise ConfigError(f"codec {self.codec!r}: use one of {', '.join(CODEC_CHOICES)}")
        if not self.slow_link_mbit > 0 or self.slow_link_mbit == float("inf"):
            raise ConfigError(f"slow_link_mbit {self.slow_link_mbit!r}: use a number of Mbit/s above 0, e.g. 100")
        if self.public_name is not None:
            try:
                check_public_name(self.public_name)
            except RecordError as e:
                raise ConfigError(f"--public-name: {e.message}") from None
        if not 0.0 <= self.spot_check_rate <= 1.0:
            raise ConfigError(
                f"spot_check_rate {self.spot_check_rate!r}: use a fraction between 0 (off) and 1 (every hop), e.g. 0.01"
            )
        if self.test_lie and os.environ.get("PETAL_TEST_ONLY") != "1":
            raise ConfigError(
                "--test-lie makes this server return wrong activations on purpose and exists only for tests; "
                "remove it (or set PETAL_TEST_ONLY=1 in a test)"
            )
        if not (self.test_lie >= 0 and self.test_lie != float("inf")):
            raise ConfigError(f"test_lie {self.test_lie!r}: use a relative noise size >= 0")
        if self.serve:
            self._validate_serving()
        elif self.adapters:
            raise ConfigError("--adapter needs --serve: adapters are served with the blocks of a model")
        return self

    def serve_specs(self) -> list[tuple[str, str | None]]:
        """(model, blocks "A:B" or None) per `serve` entry: an entry's own ":A:B" suffix, else `blocks`."""
        specs = []
        for entry in self.serve:
            model, blocks = split_serve(entry)
            specs.append((model, blocks if blocks is not None else self.blocks))
        return specs

    def adapter_dirs(self) -> list[tuple[str, Path]]:
        """(name, PEFT dir) per `adapters` entry: "NAME=DIR", or "DIR" named after its last path part (checked in
        `_validate_serving`)."""
        return [(name, Path(path).expanduser()) for name, path in adapter_entries(self.adapters)]

    def direct_listen(self) -> str | None:
        """The direct data plane's "HOST:PORT", or None when it is off (see `direct`)."""
        if self.direct in (None, "off"):
            return None
        if self.direct != "auto":
            return self.direct
        for addr in self.listen:
            parts = addr.strip().split("/")
            if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp" and parts[4].isdigit():
                port = int(parts[4])
                host = f"[{parts[2]}]" if parts[1] == "ip6" else parts[2]
                return f"{host}:{port + 1 if 0 < port < 65535 else 0}"
        return None  # no TCP listen address to take the host from: libp2p only

    def _validate_serving(self) -> None:
        if self.blocks is not None and self.num_blocks is not None:
            raise ConfigError("pass either --blocks A:B or --num-blocks N, not both")
        for blocks in [self.blocks, *(split_serve(entry)[1] for entry in self.serve)]:
            if blocks is not None:
                parts = blocks.split(":")
                if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
                    raise ConfigError(f"--blocks {blocks!r}: use START:END with START < END, e.g. 0:10")
        try:
            adapter_entries(self.adapters)
        except ValueError as e:
            raise ConfigError(f"--adapter: {e}") from None
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"--num-blocks {self.num_blocks}: host at least one block")
        choices = {
            "device": ("cpu", "cuda"),
            "dtype": ("float32", "bfloat16", "float16"),
            "quant": ("none", "int8"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in ("max_batch", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_cache_tokens is not None and self.max_cache_tokens < 1:
            raise ConfigError("max_cache_tokens must be at least 1 (tokens x blocks)")
        if self.rebalance_period <= 0:
            raise ConfigError("rebalance_period must be > 0 seconds")
        if self.activation_budget_mb is not None and self.activation_budget_mb < 0:
            raise ConfigError("activation_budget_mb must be >= 0 (0: keep no activations)")
        if self.alloc_timeout < 0:
            raise ConfigError("alloc_timeout must be >= 0 seconds")
        if self.pipeline_min_tokens < 0:
            raise ConfigError("pipeline_min_tokens must be >= 0 (0: no pipeline; default 128)")
        if self.max_batch_tokens < 0:
            raise ConfigError("max_batch_tokens must be >= 0 (0 or 1: no batching; default 1024)")


_PATH_FIELDS = {"state_dir", "socket"}


def split_serve(entry: str) -> tuple[str, str | None]:
    """``"MODEL:A:B"`` -> ``("MODEL", "A:B")``; an entry without a numeric ``:A:B`` suffix is a model alone."""
    parts = entry.rsplit(":", 2)
    if len(parts) == 3 and parts[0] and parts[1].strip().isdigit() and parts[2].strip().isdigit():
        return parts[0], f"{parts[1].strip()}:{parts[2].strip()}"
    return entry, None


def _toml_type_mismatch(annotation: str, value: object) -> str | None:
    """What a TOML value for a Config field of type `annotation` should be, or None when it is that."""
    base = annotation.removesuffix(" | None")
    if base == "list[str]":
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        return None if ok else "a string or a list of strings"
    if base == "bool":
        return None if isinstance(value, bool) else "true or false"
    if base == "int":
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if base == "float":
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    return None if isinstance(value, str) else "a string"  # str and Path


def load_config(path: str | os.PathLike[str] | None, overrides: dict[str, object]) -> Config:
    """Defaults, then the TOML file (keys as in Config, dashes or underscores), then non-None overrides."""
    values: dict[str, object] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"cannot read config file {path} ({reason}): pass a readable TOML file") from None
        types = {f.name: str(f.type) for f in dataclasses.fields(Config)}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in types:
                raise ConfigError(f"config file {path}: unknown setting {key!r}; known: {', '.join(sorted(types))}")
            if want := _toml_type_mismatch(types[name], value):
                raise ConfigError(f"config file {path}: {key} = {value!r:.60} should be {want}")
            values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None and v != () and v != []})
    for name in _PATH_FIELDS & values.keys():
        values[name] = Path(os.path.expanduser(str(values[name])))
    for name in ("listen", "initial_peers", "serve", "adapters"):
        value = values.get(name)
        if isinstance(value, str):
            values[name] = [value]
        elif isinstance(value, tuple):
            values[name] = list(value)
    try:
        return Config(**values).validate()  # type: ignore[arg-type]
    except TypeError as e:
        raise ConfigError(f"bad configuration: {e}") from None
