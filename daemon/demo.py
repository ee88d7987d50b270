"""`python -m petal.daemon.demo` (`make demo`): chat with SmolLM2 through a swarm of three local petald daemons.

Three daemons on loopback serve blocks [0,10), [10,20) and [20,30); the first is also the client's local daemon,
and `petalctl generate` asks it over its socket, so the answer streams through the whole real path. `--local`
runs the same spans in one process instead (no daemons), which is what `greedy_tokens` is for.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click
import torch

from petal.daemon.pull import pull_model
from petal.kernels.families.base import ClientPartsBase
from petal.kernels.span import Span
from petal.kernels.store import load_client_parts, load_span, open_model

if TYPE_CHECKING:
    from transformers import BatchEncoding

__all__ = ["greedy_tokens", "main"]


@torch.no_grad()
def greedy_tokens(
    parts: ClientPartsBase,
    spans: Sequence[Span],
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
) -> Iterator[int]:
    """Yield greedy tokens for one prompt `[1, T]` through chained spans, each keeping its own KV cache.

    Stops after `max_new_tokens` or right after yielding an end-of-sequence token, as `generate` does.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, tokens], got {tuple(input_ids.shape)}")
    max_length = input_ids.shape[1] + max_new_tokens
    caches = [span.new_cache(1, max_length, dtype, input_ids.device) for span in spans]
    tokens = input_ids
    for _ in range(max_new_tokens):
        hidden = parts.embed(tokens).to(dtype)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span.step(hidden, cache)
        token = int(parts.logits(hidden[:, -1:].to(torch.float32)).argmax(-1))
        yield token
        if token in eos_token_ids:
            return
        tokens = torch.tensor([[token]], device=input_ids.device)


def _cuts(num_blocks: int, pieces: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / pieces) for i in range(pieces + 1)]
    return list(itertools.pairwise(bounds))


PETALCTL = [sys.executable, "-c", "from petal.ctl.cli import main; main()"]  # a process: daemon/ never imports ctl/


def _petalctl_json(socket_path: Path, *args: str) -> dict | None:
    """Run `petalctl --json ARGS` against the socket; None if it failed (daemon not up yet, no route yet)."""
    done = subprocess.run([*PETALCTL, "--socket", str(socket_path), "--json", *args], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else None


def _wait_ready(proc: subprocess.Popen, socket_path: Path, log: Path, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"petald exited with {proc.returncode}; its log:\n{log.read_text()[-3000:]}")
        if socket_path.exists() and (status := _petalctl_json(socket_path, "status")) is not None:
            return status
        time.sleep(0.3)
    raise TimeoutError(f"petald not ready after {timeout} s; see {log}")


def swarm_demo(prompt: str, max_new_tokens: int, keep: bool = False) -> int:
    """Start three serving daemons, generate through them with petalctl, stop them by PID; returns petalctl's code."""

    pull_model("smollm2")
    root = Path(tempfile.mkdtemp(prefix="petal-demo-", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    try:
        first_addr = None
        sockets = []
        for i, blocks in enumerate(["0:10", "10:20", "20:30"]):
            sock, log = root / f"d{i}.sock", root / f"d{i}.log"
            join = ["--new-swarm"] if first_addr is None else ["--initial-peer", first_addr]
            cmd = [
                sys.executable,
                "-m",
                "petal.daemon",
                "--state-dir",
                str(root / f"d{i}"),
                "--socket",
                str(sock),
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                *join,
                "--serve",
                "smollm2",
                "--blocks",
                blocks,
            ]
            with open(log, "ab") as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
            t0 = time.monotonic()
            status = _wait_ready(procs[-1], sock, log)
            first_addr = first_addr or status["addrs"][0]
            sockets.append(sock)
            click.echo(
                f"# daemon {i} (pid {procs[-1].pid}) serves blocks {blocks}, ready in {time.monotonic() - t0:.1f} s",
                err=True,
            )
        deadline = time.monotonic() + 60
        while (route := _petalctl_json(sockets[0], "route", "-m", "smollm2")) is None:
            if time.monotonic() > deadline:  # the last server's announcement may take a moment to be readable
                raise RuntimeError(f"no route through the demo swarm after 60 s; see the logs in {root}")
            time.sleep(0.5)
        chain = route["chain"]
        click.echo("# route: " + " -> ".join(f"{h['start']}:{h['end']}@{h['peer_id'][-6:]}" for h in chain), err=True)
        click.echo(f"# petalctl --socket {sockets[0]} generate -m smollm2 --chat {prompt!r}", err=True)
        t0 = time.monotonic()
        code = subprocess.call(
            [
                *PETALCTL,
                "--socket",
                str(sockets[0]),
                "generate",
                "-m",
                "smollm2",
                "--chat",
                "--max-new-tokens",
                str(max_new_tokens),
                prompt,
            ]
        )
        click.echo(f"# answered in {time.monotonic() - t0:.1f} s", err=True)
        return code
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


@click.command()
@click.option("--prompt", default="What is the capital of France? Answer in one sentence.", show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--local", is_flag=True, help="No daemons: run the spans in this process.")
@click.option("--spans", "pieces", default=3, show_default=True, help="With --local: how many chained spans.")
@click.option("--quant", type=click.Choice(["none", "int8"]), default="none", show_default=True, help="With --local.")
def main(prompt: str, max_new_tokens: int, local: bool, pieces: int, quant: str) -> None:
    """Pull SmolLM2 (once) and answer PROMPT greedily through three local daemons, streaming to stdout."""
    if not local:
        sys.exit(swarm_demo(prompt, max_new_tokens))
    from transformers import AutoTokenizer

    info = open_model(pull_model("smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    parts = load_client_parts(info)
    cuts = _cuts(info.num_blocks, pieces)
    spans = [load_span(info, a, b, quant=quant) for a, b in cuts]
    click.echo(f"# {info.name} ({info.fingerprint}), spans {cuts}, quant={quant}", err=True)
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = cast("BatchEncoding", encoded)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    generated: list[int] = []
    shown = ""
    for token in greedy_tokens(parts, spans, ids, max_new_tokens, eos):
        if token in eos:
            break
        generated.append(token)
        text = cast(str, tokenizer.decode(generated, skip_special_tokens=True))
        sys.stdout.write(text[len(shown) :])  # decode the whole answer so multi-token characters come out right
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
