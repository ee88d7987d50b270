"""Daemon start-up and idle memory: real `petald` processes started N times, medians printed.

For a client-only daemon (0 blocks) and a server of SmolLM2 blocks 0:10 (--blocks 0:10): seconds from exec to the
socket answering GET /v1/status, to READY=1 (sd_notify), and (servers) to the span going online (the log line
"serving ..." that follows the online announcement, millisecond stamps). Then each daemon's idle RSS (2 s after
READY=1), the server's peak RSS (VmHWM: loading included), the bytes of the hosted weights (from the safetensors
header, in the served float32), the KV budget (from its log line) and RSS - (weights + KV budget): what the process
holds besides those two. Whether libtorch is mapped into the client-only daemon when it is ready is printed too.

    .venv/bin/python tests/benchmarks/bench_startup.py [--model smollm2] [--runs 5] [--blocks 0:10] [--baseline DIR]
    .venv/bin/python tests/benchmarks/bench_startup.py --phases    # seconds per import and step, one process

Each run starts a server on a fresh state dir ("cold": it measures its throughput) and again on the same state dir
("warm": the figure comes from the cache). `--baseline DIR` also starts an older checkout, interleaved, e.g.

    mkdir -p /tmp/base/src /tmp/base/pkg/petal && git archive HEAD | tar -x -C /tmp/base/src
    for d in protocol kernels daemon ctl; do ln -s /tmp/base/src/$d /tmp/base/pkg/petal/$d; done
    .venv/bin/python tests/benchmarks/bench_startup.py --baseline /tmp/base/pkg
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from petal.ctl.client import Client, DaemonError

MODELS_DIR = Path.home() / ".local/share/petal/models"
MARK = "\n--- bench_startup: start ---\n"


def weights_bytes(model_dir: Path, start: int, end: int, served_bytes: int = 4) -> int:
    """Bytes of blocks [start, end) as served (float32: 4 bytes an element), from the safetensors headers."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            m = re.search(r"layers\.(\d+)\.", name)
            if name == "__metadata__" or m is None or not start <= int(m.group(1)) < end:
                continue
            numel = 1
            for d in meta["shape"]:
                numel *= d
            total += numel * served_bytes
    return total


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def start_once(
    root: Path, name: str, args: list[str], model: str | None, env_extra: dict[str, str]
) -> dict[str, float]:
    """Start one daemon, time exec -> socket answers, -> READY=1 (-> block 0 online), then stop it by PID."""
    state = root / name
    state.mkdir(parents=True, exist_ok=True)
    sock_path, notify_path = root / f"{name}.sock", root / f"{name}.notify"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    log = open(root / f"{name}.log", "ab")  # noqa: SIM115 - closed below
    log.write(MARK.encode())  # a state dir (and log) is started twice: read only this start's lines
    log.flush()
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), **env_extra}
    cmd = [sys.executable, "-m", "petal.daemon", "--state-dir", str(state), "--socket", str(sock_path)]
    cmd += ["--listen", "/ip4/127.0.0.1/tcp/0", "--new-swarm", "--log-level", "info", *args]
    client = Client(sock_path, timeout=5)
    out: dict[str, float] = {}
    wall0, t0 = time.time(), time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = t0 + 300
        while time.monotonic() < deadline and ("ready" not in out or "socket" not in out):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}: {(root / f'{name}.log').read_text()[-2000:]}"
                )
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n") and "ready" not in out:
                    out["ready"] = time.monotonic() - t0
            except BlockingIOError:
                pass
            if "socket" not in out and sock_path.exists():
                try:
                    client.status()
                    out["socket"] = time.monotonic() - t0
                except (DaemonError, OSError):
                    pass
            time.sleep(0.005)
        if "ready" not in out:
            raise TimeoutError(f"{name} not ready")
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        out["torch_mapped"] = float("libtorch" in maps)
        time.sleep(2.0)  # idle
        out.update({k: float(v) for k, v in proc_status(proc.pid).items()})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        notify.close()
        log.close()
    text = (root / f"{name}.log").read_text(errors="replace").split(MARK)[-1]
    if model is not None and (online := re.search(r"^(\S+ \S+),(\d{3}) INFO petal\.server: serving ", text, re.M)):
        stamp = time.mktime(time.strptime(online.group(1), "%Y-%m-%d %H:%M:%S")) + int(online.group(2)) / 1000
        out["online"] = stamp - wall0  # the log line that follows the "online" announcement (millisecond stamps)
    if m := re.findall(r"KV budget \d+ token-blocks \(([\d.]+) MiB\)", text):
        out["kv"] = float(m[-1]) * 2**20
    return out


def med(runs: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in runs if key in r and r[key] == r[key]]
    return statistics.median(values) if values else float("nan")


def report(label: str, client_runs: list[dict], cold: list[dict], warm: list[dict], weights: int) -> None:
    mib = 2**20
    print(f"\n{label}")
    print(f"{'daemon':<26}{'exec->socket s':>16}{'exec->READY s':>15}{'exec->online s':>16}")
    for name, runs in (("client only (0 blocks)", client_runs), ("server, cold", cold), ("server, warm", warm)):
        print(f"{name:<26}{med(runs, 'socket'):>16.2f}{med(runs, 'ready'):>15.2f}{med(runs, 'online'):>16.2f}")
    mapped = sum(r["torch_mapped"] for r in client_runs)
    print(
        f"client-only daemon with libtorch mapped when ready: {mapped:.0f} of {len(client_runs)} runs; "
        f"its idle RSS {med(client_runs, 'VmRSS') / mib:.0f} MiB"
    )
    for name, runs in (("cold", cold), ("warm", warm)):
        kv, rss, hwm = med(runs, "kv"), med(runs, "VmRSS"), med(runs, "VmHWM")
        print(
            f"server ({name}) idle RSS {rss / mib:.0f} MiB, peak (VmHWM) {hwm / mib:.0f} MiB; weights "
            f"{weights / mib:.0f} MiB, KV budget {kv / mib:.0f} MiB; RSS - (weights + KV) = "
            f"{(rss - weights - kv) / mib:.0f} MiB"
        )


LAPS = """
import sys, time
from pathlib import Path
t = [time.perf_counter()]
def lap(name):
    now = time.perf_counter(); print(f"{name:<58}{now - t[0]:6.2f}"); t[0] = now
import petal.daemon.main; lap("import petal.daemon.main (click, config)")
import petal.daemon.node; lap("import petal.daemon.node (aiohttp, libp2p, DHT, api)")
import torch; lap("import torch")
import petal.kernels.store; lap("import petal.kernels.store (model code)")
import petal.daemon.serving.host, petal.daemon.api.routes; lap("import serving + torch-using API modules")
from petal.kernels.store import load_span, open_model
from petal.daemon.serving.compute import SpanCompute
from petal.daemon.serving.throughput import measure_throughput
torch.set_num_threads(1)
info = open_model(sys.argv[1]); info.fingerprint; lap("open model + fingerprint")
span = load_span(info, int(sys.argv[2]), int(sys.argv[3])); lap(f"load blocks {sys.argv[2]}:{sys.argv[3]}")
measure_throughput(SpanCompute(span, torch.float32, torch.device("cpu"))); lap("throughput measurement (cold only)")
print(f"{'transformers imported by the server path':<58}{'transformers' in sys.modules!s:>6}")
"""


def phases(model_dir: Path, start: int, end: int) -> None:
    """Where a server's start-up seconds go: each import and step timed in one fresh interpreter."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    print(f"{'bare interpreter':<58}{time.perf_counter() - t0:6.2f}")
    subprocess.run([sys.executable, "-W", "ignore", "-c", LAPS, str(model_dir), str(start), str(end)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--blocks", default="0:10")
    ap.add_argument(
        "--baseline",
        help="a dir whose `petal` folder links protocol, kernels, daemon, ctl of an older checkout (`git archive`): "
        "started with PYTHONPATH=DIR, interleaved with this tree's runs",
    )
    ap.add_argument("--phases", action="store_true", help="only time each start-up phase in one fresh process")
    args = ap.parse_args()
    model_dir = Path(args.model) if Path(args.model).is_dir() else MODELS_DIR / args.model
    start, end = (int(x) for x in args.blocks.split(":"))
    if args.phases:
        phases(model_dir, start, end)
        return
    weights = weights_bytes(model_dir, start, end)
    trees = {"this tree": {}}
    if args.baseline:
        trees["baseline " + args.baseline] = {"PYTHONPATH": args.baseline}
    runs: dict[str, tuple[list[dict], list[dict], list[dict]]] = {t: ([], [], []) for t in trees}
    root = Path(tempfile.mkdtemp(prefix="petal-bs-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    serve = ["--serve", str(model_dir), "--blocks", args.blocks]
    try:
        for i in range(args.runs):
            for k, (tree, env) in enumerate(trees.items()):
                client_runs, cold, warm = runs[tree]
                client_runs.append(start_once(root, f"c{i}{k}", [], None, env))
                cold.append(start_once(root, f"s{i}{k}", serve, model_dir.name, env))
                warm.append(start_once(root, f"s{i}{k}", serve, model_dir.name, env))  # same state dir: cached
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"petald start-up, medians of {args.runs} interleaved runs, model {model_dir.name} blocks {args.blocks}")
    for tree, (client_runs, cold, warm) in runs.items():
        report(tree, client_runs, cold, warm, weights)


if __name__ == "__main__":
    main()
