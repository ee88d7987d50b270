"""Emulated networks for tests and benchmarks: each daemon in its own Linux network namespace, joined by veth pairs
to a bridge namespace, with per-link delay, jitter, loss and rate; optionally hosts behind a masquerading NAT.

Layout of one ``Lab`` (names carry the pid and a counter, so concurrent labs never collide)::

    host ns "<p>h0" eth0 10.77.0.1 ─┐
    host ns "<p>h1" eth0 10.77.0.2 ─┼─ bridge ns "<p>br": br0 (every host's peer veth is a port)
    NAT router "<p>hK" eth0 10.77.0.K┘  lan0 192.168.77.1 ── natted ns "<p>n0" eth0 192.168.77.2
                                        (masquerade out of eth0: the natted host dials out, nobody dials in)

Shaping is egress shaping on a host's eth0: an ``htb`` class (rate) per shaped destination, chosen by a ``u32``
filter on the destination address, with a ``netem`` leaf (delay, jitter, loss). Kernels built without ``sch_netem``
(this project's CI VMs among them) get the same from iptables rules per destination instead: ``statistic`` drops for
loss, and ``NFQUEUE`` to ``netdelay.py`` (a user-space delayer run in the host's namespace) for delay and jitter. A
round trip of R ms between two hosts is ``shape(a, b, R / 2)`` plus ``shape(b, a, R / 2)`` (``link`` does both).
Public hosts have no route to 192.168.77.0/24, so dialing a natted host's own address fails at once (network
unreachable) instead of hanging.

Root only: ``Lab()`` raises ``NetnsUnavailable`` (tests skip with its reason) when not root or when ``ip netns add``
fails; the NAT needs iptables (or nft), ``ping_ms`` needs ping. ``close()`` (also run at interpreter exit, and safe to
call twice) stops every daemon and delayer it started, by PID, then deletes its namespaces, which removes every veth,
qdisc and rule with them.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.daemons import Daemon

PUBLIC_NET = "10.77.0"
NAT_NET = "192.168.77"
PORT = 31330
"""Every namespace has its own addresses, so every daemon listens on the default port (direct plane: port + 1)."""

_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, no permission in this container)."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


_netem: bool | None = None


def netem_available() -> bool:
    """Whether this kernel has ``sch_netem`` (checked once in a throwaway namespace); without it delays are added by
    netdelay.py in user space (CPU per packet, enough for tests and the benchmark's rates)."""
    global _netem
    if _netem is None:
        probe = f"ptnetem{os.getpid()}"
        _run("ip", "netns", "add", probe)
        try:
            r = _run("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", check=False)
            _netem = r.returncode == 0
        finally:
            _run("ip", "netns", "del", probe, check=False)
    return _netem


def unavailable_reason() -> str | None:
    """Why this machine cannot run a Lab (None when it can): checked once with a throwaway namespace."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root); run as root to emulate WAN links and NAT"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing: install iproute2"
    probe = f"ptprobe{os.getpid()}"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed here: {r.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One namespace with one interface (eth0) at ``ip``."""

    name: str  # the namespace
    ip: str
    natted: bool = False
    classes: dict[str, int] = field(default_factory=dict)  # destination ip ("" = all) -> htb class minor
    rules: dict[str, list[list[str]]] = field(default_factory=dict)  # destination ip -> its iptables OUTPUT rules
    delays: dict[int, tuple[float, float]] = field(default_factory=dict)  # NFQUEUE number -> (delay, jitter) ms
    delayer: subprocess.Popen[bytes] | None = None  # this host's netdelay.py, when netem is missing

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def sh(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside this namespace."""
        return _run(*self.prefix, *cmd, check=check)

    @property
    def listen(self) -> str:
        return f"/ip4/{self.ip}/tcp/{PORT}"


class Lab:
    """Namespaces, links and daemons of one test; ``close()`` removes them all."""

    def __init__(self, root: Path) -> None:
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        self.root = root
        self.tag = f"pt{os.getpid() % 100000}x{next(_counter)}"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.daemons: list[Daemon] = []
        self._router: Host | None = None
        self._closed = False
        atexit.register(self.close)
        try:
            self.bridge = self._namespace("br")
            self.bridge.sh("ip", "link", "add", "br0", "type", "bridge")
            self.bridge.sh("ip", "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _namespace(self, suffix: str, ip: str = "") -> Host:
        name = f"{self.tag}{suffix}"
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        host = Host(name, ip)
        host.sh("ip", "link", "set", "lo", "up")
        return host

    def _veth(self, a: Host, a_if: str, b: Host, b_if: str) -> None:
        """A veth pair with one end in each namespace (made in ours, then moved, so names never clash)."""
        n = next(_counter)
        x, y = f"{self.tag}a{n}"[-15:], f"{self.tag}b{n}"[-15:]
        _run("ip", "link", "add", x, "type", "veth", "peer", "name", y)
        _run("ip", "link", "set", x, "netns", a.name)
        _run("ip", "link", "set", y, "netns", b.name)
        a.sh("ip", "link", "set", x, "name", a_if)
        b.sh("ip", "link", "set", y, "name", b_if)

    def add_host(self, name: str) -> Host:
        """A host on the public net (10.77.0.N/24), reachable by every other public host."""
        ip = f"{PUBLIC_NET}.{len(self.hosts) + 1}"
        host = self._namespace(f"h{len(self.hosts)}", ip)
        port = f"p{len(self.hosts)}"
        self._veth(host, "eth0", self.bridge, port)
        self.bridge.sh("ip", "link", "set", port, "master", "br0")
        self.bridge.sh("ip", "link", "set", port, "up")
        host.sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        host.sh("ip", "link", "set", "eth0", "up")
        host.sh("tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1")
        host.sh("tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit")
        host.classes[""] = 1
        self.hosts[name] = host
        return host

    def add_natted_host(self, name: str) -> Host:
        """A host behind a masquerading NAT router (iptables, or nftables when iptables is missing): it reaches the
        public net, but nothing there can open a connection to it. One NAT router per lab, shared by natted hosts."""
        if self._router is None:
            self._router = router = self.add_host("_nat")
            router.sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
            self._nat_rules(router)
        router = self._router
        index = sum(h.natted for h in self.hosts.values())
        ip = f"{NAT_NET}.{index + 2}"
        host = self._namespace(f"n{index}", ip)
        host.natted = True
        lan = f"lan{index}"
        self._veth(host, "eth0", router, lan)
        router.sh("ip", "addr", "add", f"{NAT_NET}.1/32", "dev", lan, check=False)
        router.sh("ip", "link", "set", lan, "up")
        router.sh("ip", "route", "add", f"{ip}/32", "dev", lan)
        host.sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        host.sh("ip", "link", "set", "eth0", "up")
        host.sh("ip", "route", "add", f"{NAT_NET}.1/32", "dev", "eth0")
        host.sh("ip", "route", "add", "default", "via", f"{NAT_NET}.1", "dev", "eth0")
        self.hosts[name] = host
        return host

    def add_host_behind_own_nat(self, name: str) -> Host:
        """A host alone behind its own masquerading NAT router (iptables only), on its own LAN 192.168.(78+K).0/24:
        two such hosts are both NATed and cannot reach each other's LAN (what a true hole punch must get through).
        The router is the public host ``_nat_<name>``. Linux masquerade keeps the source port where it can and lets in
        what matches an existing mapping, so TCP simultaneous open through two of them can work."""
        if shutil.which("iptables") is None:
            raise NetnsUnavailable("iptables is not installed: apt-get install iptables")
        k = sum(1 for h in self.hosts if h.startswith("_nat_"))
        net = f"192.168.{78 + k}"
        router = self.add_host(f"_nat_{name}")
        router.sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        router.sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"{net}.0/24", "-o", "eth0", "-j", "MASQUERADE")
        router.sh("iptables", "-A", "FORWARD", "-i", "eth0", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
        # like most home routers, drop unsolicited connections to the router itself silently: a RST back would kill
        # the other side's half of a simultaneous open that arrives before our own SYN has left
        router.sh("iptables", "-A", "INPUT", "-i", "eth0", "-p", "tcp", "-m", "conntrack", "--ctstate", "NEW", "-j",
                  "DROP")  # fmt: skip
        host = self._namespace(f"m{k}", f"{net}.2")
        host.natted = True
        self._veth(host, "eth0", router, "lan0")
        router.sh("ip", "addr", "add", f"{net}.1/24", "dev", "lan0")
        router.sh("ip", "link", "set", "lan0", "up")
        host.sh("ip", "addr", "add", f"{net}.2/24", "dev", "eth0")
        host.sh("ip", "link", "set", "eth0", "up")
        host.sh("ip", "route", "add", "default", "via", f"{net}.1", "dev", "eth0")
        self.hosts[name] = host
        return host

    def _nat_rules(self, router: Host) -> None:
        if shutil.which("iptables"):
            router.sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"{NAT_NET}.0/24", "-o", "eth0", "-j",
                      "MASQUERADE")  # fmt: skip
            # a NAT forwards replies only: no new connection from the public side reaches the LAN
            router.sh("iptables", "-A", "FORWARD", "-i", "eth0", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
        elif shutil.which("nft"):
            rules = (
                "table ip nat { chain post { type nat hook postrouting priority 100; "
                f'ip saddr {NAT_NET}.0/24 oifname "eth0" masquerade; }} }}\n'
                "table ip filter { chain fwd { type filter hook forward priority 0; "
                'iifname "eth0" ct state new drop; } }\n'
            )
            r = subprocess.run([*router.prefix, "nft", "-f", "-"], input=rules, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"nft failed: {r.stderr.strip()}")
        else:
            raise NetnsUnavailable("neither iptables nor nft is installed: apt-get install iptables")

    # shaping

    def shape(
        self,
        src: str,
        dst: str | None = None,
        *,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss_pct: float = 0.0,
        rate_mbit: float | None = None,
    ) -> None:
        """Egress of host ``src`` towards host ``dst`` (every destination when None): one-way delay, jitter, loss and
        rate. Calling it again for the same pair replaces that pair's settings."""
        host = self.hosts[src]
        if host.natted:
            raise ValueError("shape the NAT router's side instead: natted hosts have no shaping classes")
        dst_ip = self.hosts[dst].ip if dst is not None else ""
        rate = f"{rate_mbit}mbit" if rate_mbit else "10gbit"
        minor = host.classes.get(dst_ip)
        verb = "change" if minor is not None else "add"
        if minor is None:
            minor = host.classes[dst_ip] = len(host.classes) + 1
        cls = f"1:{minor}"
        host.sh("tc", "class", verb, "dev", "eth0", "parent", "1:", "classid", cls, "htb", "rate", rate,
                "burst", "256k")  # fmt: skip
        if dst_ip and verb == "add":
            host.sh("tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                    "match", "ip", "dst", f"{dst_ip}/32", "flowid", cls)  # fmt: skip
        if netem_available():
            netem = ["netem", "limit", "100000", "delay", f"{delay_ms}ms"]
            netem += [f"{jitter_ms}ms"] if jitter_ms else []
            netem += ["loss", f"{loss_pct}%"] if loss_pct else []
            host.sh("tc", "qdisc", "replace", "dev", "eth0", "parent", cls, "handle", f"{minor + 10}:", *netem)
            return
        # no sch_netem in this kernel: loss by an iptables rule, delay by netdelay.py on an NFQUEUE per class
        match = ["-o", "eth0", *(["-d", f"{dst_ip}/32"] if dst_ip else [])]
        for rule in host.rules.pop(dst_ip, []):
            host.sh("iptables", "-D", "OUTPUT", *rule, check=False)
        rules = []
        if loss_pct:
            rules.append([*match, "-m", "statistic", "--mode", "random", "--probability", str(loss_pct / 100),
                          "-j", "DROP"])  # fmt: skip
        if delay_ms or jitter_ms:
            rules.append([*match, "-j", "NFQUEUE", "--queue-num", str(minor), "--queue-bypass"])
            host.delays[minor] = (delay_ms, jitter_ms)
        else:
            host.delays.pop(minor, None)
        for rule in reversed(rules):  # destination rules go first, before any catch-all of this host
            host.sh("iptables", "-I" if dst_ip else "-A", "OUTPUT", *(["1"] if dst_ip else []), *rule)
        host.rules[dst_ip] = rules
        self._restart_delayer(host)

    def _restart_delayer(self, host: Host) -> None:
        """One netdelay.py per host, serving all its delayed classes; restarted (by PID) when they change."""
        if host.delayer is not None:
            host.delayer.terminate()
            host.delayer.wait(timeout=10)
            host.delayer = None
        if not host.delays:
            return
        spec = [f"{q}:{d}:{j}" for q, (d, j) in host.delays.items()]
        script = Path(__file__).with_name("netdelay.py")
        host.delayer = subprocess.Popen([*host.prefix, sys.executable, str(script), *spec])
        time.sleep(0.3)  # let it bind its queues (until then --queue-bypass lets packets through undelayed)
        if host.delayer.poll() is not None:
            raise RuntimeError(f"netdelay.py exited with {host.delayer.returncode} in {host.name}")

    def link(self, a: str, b: str | None = None, *, rtt_ms: float = 0.0, **kw: float) -> None:
        """Both directions of a link: half the round trip each way (``b`` None: ``a`` to everyone and back).

        With ``b`` None only ``a``'s egress gets the whole round trip's delay, as its ingress cannot be shaped."""
        if b is None:
            self.shape(a, delay_ms=rtt_ms, **kw)
            return
        self.shape(a, b, delay_ms=rtt_ms / 2, **kw)
        self.shape(b, a, delay_ms=rtt_ms / 2, **kw)

    def cut(self, natted: str, public: str) -> None:
        """The NAT router resets every TCP connection between natted host ``natted`` and public host ``public`` (both
        ways) and refuses new ones, as if its mapping went away and no new one could be made: their next segment gets
        a RST, so both ends notice at once instead of waiting out TCP's timeouts. Other traffic is untouched."""
        router, a, b = self._router, self.hosts[natted], self.hosts[public]
        if router is None or not a.natted or b.natted:
            raise ValueError(f"cut() needs a natted host and a public one: got {natted!r}, {public!r}")
        for src, dst in ((a.ip, b.ip), (b.ip, a.ip)):
            if shutil.which("iptables"):
                router.sh("iptables", "-I", "FORWARD", "1", "-s", src, "-d", dst, "-p", "tcp", "-j", "REJECT",
                          "--reject-with", "tcp-reset")  # fmt: skip
            else:
                router.sh("nft", "insert", "rule", "ip", "filter", "fwd", "ip", "saddr", src, "ip", "daddr", dst,
                          "meta", "l4proto", "tcp", "reject", "with", "tcp", "reset")  # fmt: skip

    def ping_ms(self, src: str, dst: str, count: int = 5) -> float:
        """Average round trip of ``count`` pings from ``src`` to ``dst``, in ms."""
        out = self.hosts[src].sh("ping", "-n", "-q", "-c", str(count), "-i", "0.2", self.hosts[dst].ip).stdout
        m = re.search(r"= [\d.]+/([\d.]+)/", out)
        if m is None:
            raise RuntimeError(f"no ping summary in: {out}")
        return float(m.group(1))

    # daemons

    def daemon(self, host: str, name: str, *args: str) -> Daemon:
        """A petald (not started) inside ``host``'s namespace, listening on its address; state under ``root``."""
        h = self.hosts[host]
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True)
        d = Daemon(
            name, state, self.root / f"{name}.sock", self.root / f"{name}.log", list(args), prefix=h.prefix,
            listen=h.listen,
        )  # fmt: skip
        self.daemons.append(d)
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for h in self.hosts.values():
            if h.delayer is not None and h.delayer.poll() is None:
                h.delayer.kill()
                h.delayer.wait(timeout=10)
        for d in self.daemons:
            try:
                d.stop(timeout=10)
            except Exception:  # noqa: BLE001 - go on removing the rest
                if d.proc is not None and d.proc.poll() is None:
                    d.proc.kill()
        for name in reversed(self.namespaces):
            _run("ip", "netns", "del", name, check=False)
        self.namespaces.clear()
        atexit.unregister(self.close)


def leftover_namespaces(lab: Lab) -> list[str]:
    """This lab's namespaces that still exist (for tests of the cleanup)."""
    out = _run("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(lab.tag)]


@contextlib.contextmanager
def lab_or_skip(prefix: str = "petal-ns-") -> Iterator[Lab]:
    """A Lab under a fresh short dir in /tmp (AF_UNIX socket paths are limited to 108 bytes) for one test, which is
    skipped with the reason when namespaces cannot be made here; closed and its dir removed afterwards."""
    import pytest

    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        try:
            lab = Lab(root)
        except NetnsUnavailable as e:
            pytest.skip(str(e))
        try:
            yield lab
        finally:
            lab.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
