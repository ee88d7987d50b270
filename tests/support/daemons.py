"""Start and stop real petald processes for tests: each has its own state dir, socket and NOTIFY_SOCKET.

Readiness is read from the daemon's sd_notify READY=1, so every test that starts daemons also checks that
petald honours NOTIFY_SOCKET. Daemons are stopped by PID, SIGTERM first, SIGKILL after a bounded wait.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from petal.ctl.client import Client, DaemonError

READY_TIMEOUT = 120.0


@dataclass
class Daemon:
    name: str
    state_dir: Path
    socket: Path
    log_path: Path
    args: list[str]
    proc: subprocess.Popen | None = None
    notify: socket.socket | None = None
    notify_path: Path | None = None
    notifications: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)  # run under this, e.g. ["ip", "netns", "exec", NS] (netns.py)
    listen: str = "/ip4/127.0.0.1/tcp/0"

    @property
    def client(self) -> Client:
        return Client(self.socket, timeout=120)

    def status(self) -> dict:
        return self.client.status()

    @property
    def address(self) -> str:
        return self.status()["addrs"][0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, extra_env: dict[str, str] | None = None) -> Daemon:
        self.notify_path = self.state_dir.parent / f"{self.name}.notify"
        self.notify_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **(extra_env or {})}
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "petal.daemon",
            "--state-dir",
            str(self.state_dir),
            "--socket",
            str(self.socket),
            "--listen",
            self.listen,
            "--log-level",
            "info",
            *self.args,
        ]
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - the daemon writes to it until stop() closes it
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        assert self.notify is not None and self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            self.notify.settimeout(0.2)
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            self.notifications.append(msg)
            if "READY=1" in msg.splitlines():
                return
        raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Stop by PID; returns the exit code (None if it had to be SIGKILLed after the timeout)."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        elif self.proc is not None:
            code = self.proc.returncode
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        if getattr(self, "_log_file", None):
            self._log_file.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Swarm:
    """A set of daemons under one tmp dir; `close()` stops every one still running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[Daemon] = []

    def make(self, name: str, *args: str) -> Daemon:
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True)
        d = Daemon(name, state, self.root / f"{name}.sock", self.root / f"{name}.log", list(args))
        self.daemons.append(d)
        return d

    def start(self, name: str, *args: str) -> Daemon:
        return self.make(name, *args).start()

    def start_bootstrap(self, name: str = "boot", *args: str) -> Daemon:
        return self.start(name, "--new-swarm", *args)

    def join(self, name: str, boot: Daemon, *args: str) -> Daemon:
        return self.start(name, "--initial-peer", boot.address, *args)

    def close(self) -> None:
        for d in self.daemons:
            d.stop()


def wait_for_route(daemon: Daemon, model: str, num_blocks: int, timeout: float = 60.0) -> list[dict]:
    """The last server's announcement can take a moment to be readable from the client's DHT node."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            chain = daemon.client.get(f"/v1/route?model={model}")["chain"]
            if chain and chain[0]["start"] == 0 and chain[-1]["end"] == num_blocks:
                return chain
        except DaemonError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no route over {model}'s {num_blocks} blocks after {timeout} s:\n{daemon.log()[-2000:]}"
            )
        time.sleep(0.5)
