"""Issue 17's figures: the swarm against the fastest local single process on the same weights and thread count.

Set-ups, all kept up at once and run interleaved (round r runs every set-up once, the order alternating), every
process on `--threads` torch threads:

  local         the project's own blocks and client parts in this process (`load_span` + `load_client_parts`),
                driven by the same code as the swarm client (`RemoteModelForCausalLM` with local blocks);
  transformers  `AutoModelForCausalLM` in this process (a second baseline; decode with its KV cache);
  3 hops        three petald serving [0,n/3) [n/3,2n/3) [2n/3,n) + a client petald with no blocks; this process is
                the Python client (`RemoteModelForCausalLM.from_pretrained(dir, socket)`), so the socket, the client
                daemon, the wire between daemons and the servers are all on the path;
  1 hop         one petald serving every block + a client petald (with --hops: per extra hop = (3 hops - 1 hop) / 2);
  3 hops in turn  (forward and prefill only) 3 hops whose client petald runs with --pipeline-min-tokens 0: the
                batch (the prompt) goes hop after hop as one, where by default it runs as a pipeline of micro-batches
                (position chunks) and the servers compute at the same time.

Workloads: decode (greedy, one token per step, the inference session streamed over the socket; per-step times of
`--steps` steps after a prefill), forward `--fwd-batch` x `--tokens` (logits, no grad), forward+backward 1 x
`--tokens` with `--prompts` trainable soft prompts (prompt tuning: loss.backward() through the swarm), prefill
(time to first token of a 1 x `--prefill` prompt: open a session, run the prompt, the last position's logits).

`--budget` instead runs decode steps through 3 hops with PETAL_TRACE on in every daemon (petal.daemon.trace) and
prints where the time of one step goes: every traced event's median offset from the step's start, the gap from
the row before it, and the median gap from the same process's event before it in the same step.

    .venv/bin/python tests/benchmarks/bench_fast_path.py [--model smollm2] [--transport direct|libp2p] [--rounds 5]
    .venv/bin/python tests/benchmarks/bench_fast_path.py --budget [--steps 60] [--server-arg=--no-inline-steps]
    .venv/bin/python tests/benchmarks/bench_fast_path.py --also=--no-inline-steps   (A/B of a server flag)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from petal.ctl.remote_model import RemoteModelForCausalLM
from petal.daemon.serving.plan import resolve_model_dir
from petal.kernels.span import Span
from petal.kernels.store import load_client_parts, load_span, open_model
from tests.benchmarks.bench_swarm_model import load, wait_for_route
from tests.support.daemons import Daemon, Swarm


class LocalModel(RemoteModelForCausalLM):
    """`RemoteModelForCausalLM` with its blocks in this process: the same client code, no socket, no daemons."""

    def __init__(self, path: Path) -> None:
        info = open_model(path)
        super().__init__(info, load_client_parts(info), client=None)  # type: ignore[arg-type]
        self.span: Span = load_span(info, 0, info.num_blocks).requires_grad_(False)  # servers train no weights either

    def run_blocks(self, hidden, attention_mask, start, end, prompts=None):  # type: ignore[no-untyped-def]
        return self.span(hidden, attention_mask)

    @contextmanager
    def inference_session(self, max_length: int, batch: int = 1, *, stream: bool = True) -> Iterator[Any]:
        yield _LocalSession(self.span, self.span.new_cache(batch, max_length, torch.float32, "cpu"))


class _LocalSession:
    def __init__(self, span: Span, cache: Any) -> None:
        self.span, self.cache = span, cache

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.span.step(hidden, self.cache)


class Transformers:
    """transformers' own model: decode with its KV cache, forward, forward+backward with prompts prepended."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


def decode_times(model: Any, ids: torch.Tensor, steps: int) -> list[float]:
    """Per-step seconds of greedy decoding (embed, blocks, head, argmax), after an untimed prefill of `ids`."""
    times = []
    if isinstance(model, Transformers):
        from transformers import DynamicCache

        with torch.no_grad():
            cache = DynamicCache()
            out = model.model(input_ids=ids, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                t0 = time.perf_counter()
                out = model.model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t0)
        return times
    with torch.no_grad(), model.inference_session(ids.shape[1] + steps + 1) as session:
        hidden = session.step(model.parts.embed(ids))
        nxt = model.parts.logits(hidden[:, -1:]).argmax(-1)
        for _ in range(steps):
            t0 = time.perf_counter()
            hidden = session.step(model.parts.embed(nxt))
            nxt = model.parts.logits(hidden).argmax(-1)
            times.append(time.perf_counter() - t0)
    return times


def forward_s(model: Any, ids: torch.Tensor) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model.model(input_ids=ids).logits if isinstance(model, Transformers) else model(ids).logits
        assert logits.shape[:2] == ids.shape
        return time.perf_counter() - t0


def prefill_s(model: Any, ids: torch.Tensor) -> float:
    """Seconds to the first token of prompt `ids`: open an inference session, prefill it, the last logits."""
    with torch.no_grad():
        t0 = time.perf_counter()
        if isinstance(model, Transformers):
            logits = model.model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1]
            return time.perf_counter() - t0
        with model.inference_session(ids.shape[1] + 1) as session:
            logits = model.parts.logits(session.step(model.parts.embed(ids))[:, -1:])
            took = time.perf_counter() - t0
        assert logits.shape[:2] == (1, 1)
        return took


def train_s(model: Any, ids: torch.Tensor, init: torch.Tensor) -> float:
    """One prompt-tuning step: soft prompts (from `init`) in front of the embeddings, next-token loss, backward."""
    t0 = time.perf_counter()
    if isinstance(model, Transformers):
        prompts = init.detach().clone().requires_grad_(True)
        emb = model.model.get_input_embeddings()(ids)
        full = torch.cat([prompts[None].expand(ids.shape[0], -1, -1), emb], dim=1)
        logits = model.model(inputs_embeds=full).logits[:, prompts.shape[0] :]
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        assert prompts.grad is not None
        return time.perf_counter() - t0
    tuning = model.enable_ptune(init.shape[0])
    with torch.no_grad():
        tuning.input_prompts.copy_(init)
    try:
        model(ids, labels=ids).loss.backward()
        assert tuning.input_prompts.grad is not None
        return time.perf_counter() - t0
    finally:
        model.set_prompts(None)


class Swarmed:
    """Serving daemons cut at `cuts` + a client daemon, and the Python client on its socket."""

    def __init__(
        self,
        name: str,
        path: Path,
        cuts: list[tuple[int, int]],
        args: argparse.Namespace,
        env: dict[str, str] | None = None,
        server_args: tuple[str, ...] = (),
        client_args: tuple[str, ...] = (),
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"pf-{name}-", dir="/tmp"))  # AF_UNIX paths <= 108 bytes
        self.swarm = Swarm(self.root)
        env = {"OMP_NUM_THREADS": str(args.threads), **(env or {})}
        extra: tuple[str, ...] = ("--direct", "127.0.0.1:0") if args.transport == "direct" else ()
        serve = ("--serve", str(path), *extra, *server_args)
        try:
            boot = self.swarm.make("s0", "--new-swarm", *serve, "--blocks", f"{cuts[0][0]}:{cuts[0][1]}").start(env)
            for i, (a, b) in enumerate(cuts[1:], 1):
                self.swarm.make(f"s{i}", "--initial-peer", boot.address, *serve, "--blocks", f"{a}:{b}").start(env)
            self.client_daemon: Daemon = self.swarm.make(
                "c", "--initial-peer", boot.address, *extra, *client_args
            ).start(env)
            info = open_model(path)
            wait_for_route(self.client_daemon, info.name, info.num_blocks)
            self.model = RemoteModelForCausalLM.from_pretrained(path, self.client_daemon.socket)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.swarm.close()
        shutil.rmtree(self.root, ignore_errors=True)


IN_TURN = "3 hops in turn"


def thirds(n: int) -> list[tuple[int, int]]:
    bounds = [round(i * n / 3) for i in range(4)]
    return list(itertools.pairwise(bounds))


def figures(args: argparse.Namespace, path: Path) -> None:
    info = open_model(path)
    n, vocab = info.num_blocks, int(info.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, vocab, (1, 8), generator=gen)
    fwd_ids = torch.randint(0, vocab, (args.fwd_batch, args.tokens), generator=gen)
    train_ids = torch.randint(0, vocab, (1, args.tokens), generator=gen)
    long_ids = torch.randint(0, vocab, (1, args.prefill), generator=gen)
    setups: dict[str, Any] = {"local": LocalModel(path), "transformers": Transformers(path)}
    swarms: list[Swarmed] = []
    try:
        swarms.append(Swarmed("3hops", path, thirds(n), args))
        setups["3 hops"] = swarms[-1].model
        if args.hops:
            swarms.append(Swarmed("1hop", path, [(0, n)], args))
            setups["1 hop"] = swarms[-1].model
        if args.also:
            swarms.append(Swarmed("3also", path, thirds(n), args, server_args=(args.also,)))
            setups[f"3 hops {args.also}"] = swarms[-1].model
        if "forward" in args.only or "prefill" in args.only:
            swarms.append(Swarmed("3turn", path, thirds(n), args, client_args=("--pipeline-min-tokens", "0")))
            setups[IN_TURN] = swarms[-1].model
        hidden = int(info.config.hidden_size)
        init = torch.randn(args.prompts, hidden, generator=gen) * 0.02
        print(f"# model {info.name} ({n} blocks), {args.threads} thread(s), transport {args.transport}, load {load()}")
        for name, model in setups.items():  # untimed warm-up of every set-up alike: first calls build kernels
            if "decode" in args.only and name != IN_TURN:
                decode_times(model, prompt_ids, 2)
            if "forward" in args.only:
                forward_s(model, fwd_ids)
            if "train" in args.only and name != IN_TURN:
                train_s(model, train_ids, init)
            if "prefill" in args.only:
                prefill_s(model, long_ids)
        samples: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for r in range(args.rounds):
            order = list(setups.items())
            if r % 2:
                order.reverse()
            for name, model in order:
                if "decode" in args.only and name != IN_TURN:
                    samples[(name, "decode")] += decode_times(model, prompt_ids, args.steps)
                if "forward" in args.only:
                    samples[(name, "forward")].append(forward_s(model, fwd_ids))
                if "train" in args.only and name != IN_TURN:
                    samples[(name, "train")].append(train_s(model, train_ids, init))
                if "prefill" in args.only:
                    samples[(name, "prefill")].append(prefill_s(model, long_ids))
            latest = {f"{name} {kind}": f"{v[-1]:.3f}" for (name, kind), v in samples.items() if kind != "decode"}
            latest |= {
                f"{name} decode ms": f"{statistics.median(v[-args.steps :]) * 1e3:.2f}"
                for (name, kind), v in samples.items()
                if kind == "decode"
            }
            print(f"# round {r + 1}/{args.rounds} done, load {load()}, seconds {latest}", flush=True)
        report(samples, setups, args)
    finally:
        for s in swarms:
            s.close()


def report(samples: dict[tuple[str, str], list[float]], setups: dict[str, Any], args: argparse.Namespace) -> None:
    fwd_tokens, train_tokens = args.fwd_batch * args.tokens, args.tokens
    rows = [
        ("decode steps/s", "decode", lambda s: 1 / s),
        (f"forward {args.fwd_batch}x{args.tokens} tokens/s", "forward", lambda s: fwd_tokens / s),
        (f"fwd+bwd 1x{args.tokens} tokens/s ({args.prompts} prompts)", "train", lambda s: train_tokens / s),
        (f"prefill 1x{args.prefill} tokens/s (to first token)", "prefill", lambda s: args.prefill / s),
    ]
    names = list(setups)
    print("| workload | " + " | ".join(names) + " | 3 hops ÷ local |")
    print("|---|" + "---:|" * (len(names) + 1))
    for label, key, rate in rows:
        if not samples.get(("local", key)):
            continue
        med = {name: statistics.median(samples[(name, key)]) for name in names if samples.get((name, key))}
        cells = [f"{rate(med[name]):.2f}" if name in med else "—" for name in names]
        ratio = f"{med['local'] / med['3 hops']:.3f}"
        if IN_TURN in med:
            ratio += f" (in turn {med['local'] / med[IN_TURN]:.3f})"
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    if not samples.get(("local", "decode")):
        return
    dec = {name: statistics.median(samples[(name, "decode")]) * 1e3 for name in names if name != IN_TURN}
    line = "decode ms/step (median): " + ", ".join(f"{k} {v:.2f}" for k, v in dec.items())
    if "1 hop" in dec:
        line += f"; per extra hop {(dec['3 hops'] - dec['1 hop']) / 2:.2f} ms"
    print(line)


# --- budget ----------------------------------------------------------------------------------------------------


def budget(args: argparse.Namespace, path: Path) -> None:
    from petal.daemon import trace

    trace_dir = Path(tempfile.mkdtemp(prefix="pf-trace-", dir="/tmp"))
    info = open_model(path)
    local = LocalModel(path)
    ids = torch.randint(0, int(info.config.vocab_size), (1, 8), generator=torch.Generator().manual_seed(0))
    extra = (args.server_arg,) if args.server_arg else ()
    swarm = Swarmed("budget", path, thirds(info.num_blocks), args, env={trace.ENV: str(trace_dir)}, server_args=extra)
    windows: list[tuple[int, int, dict[str, int]]] = []
    try:
        model = swarm.model
        with torch.no_grad(), model.inference_session(ids.shape[1] + args.steps + 1) as session:
            hidden = session.step(model.parts.embed(ids))
            nxt = model.parts.logits(hidden[:, -1:]).argmax(-1)
            for _ in range(args.steps):
                t0 = time.monotonic_ns()
                emb = model.parts.embed(nxt)
                t1 = time.monotonic_ns()
                hidden = session.step(emb)
                t2 = time.monotonic_ns()
                nxt = model.parts.logits(hidden).argmax(-1)
                t3 = time.monotonic_ns()
                windows.append((t0, t3, {"py:embed done": t1, "py:step returned": t2, "py:head+argmax done": t3}))
        local_ms = statistics.median(decode_times(local, ids, args.steps)) * 1e3
    finally:
        names = {d.proc.pid: d.name for d in swarm.swarm.daemons if d.proc is not None}
        swarm.close()  # SIGTERM: each daemon writes its trace at exit
    events = collections.defaultdict(list)  # name -> [(ns, event)]
    for f in trace_dir.glob("*.trace"):
        who = names.get(int(f.stem), f.stem)
        for line in f.read_text().splitlines():
            ns, event = line.split(" ", 1)
            events[who].append((int(ns), event))
    offsets: dict[str, list[float]] = collections.defaultdict(list)
    own_gaps: dict[str, list[float]] = collections.defaultdict(list)  # from the same process's event before it
    for t0, t3, own in windows[args.steps // 10 :]:  # the first steps warm up
        for label, ns in own.items():
            offsets[label].append((ns - t0) / 1e6)
        for who, evs in events.items():
            seen: collections.Counter[str] = collections.Counter()
            before: int | None = None
            for ns, event in sorted(evs):
                if t0 <= ns <= t3:
                    label = f"{who}:{event}#{seen[event]}"
                    seen[event] += 1
                    offsets[label].append((ns - t0) / 1e6)
                    if before is not None:
                        own_gaps[label].append((ns - before) / 1e6)
                    before = ns
    full = len(windows[args.steps // 10 :])
    rows = sorted(
        ((statistics.median(v), k, len(v)) for k, v in offsets.items() if len(v) >= full * 0.9), key=lambda r: r[0]
    )
    print(f"# per-step budget: {full} decode steps through 3 hops ({args.transport}), load {load()}")
    print(f"# local (same blocks + client parts in one process): {local_ms:.2f} ms/step")
    print("| event (process:event#occurrence in the step) | median ms from step start | gap ms | gap in process ms |")
    print("|---|---:|---:|---:|")
    prev = 0.0
    for med, label, _ in rows:
        gaps = own_gaps.get(label)
        own_gap = f"{statistics.median(gaps):.2f}" if gaps else ""
        print(f"| {label} | {med:.2f} | {med - prev:+.2f} | {own_gap} |")
        prev = med
    shutil.rmtree(trace_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model name in the models dir, or a model dir")
    ap.add_argument("--transport", choices=["direct", "libp2p"], default="direct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per round")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--fwd-batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16, help="soft prompts trained in the fwd+bwd workload")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill workload")
    ap.add_argument("--hops", action="store_true", help="also a 1-hop swarm, for the cost per extra hop")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=["decode", "forward", "train", "prefill"],
        default=["decode", "forward", "train", "prefill"],
        help="the workloads to time [all four]",
    )
    ap.add_argument("--budget", action="store_true", help="trace decode steps through 3 hops instead")
    ap.add_argument(
        "--also", metavar="ARG", help="also 3 hops whose servers run with this petald flag (e.g. --no-inline-steps)"
    )
    ap.add_argument("--server-arg", metavar="ARG", help="with --budget: a petald flag for the three servers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_dir(args.model)
    (budget if args.budget else figures)(args, path)


if __name__ == "__main__":
    main()
