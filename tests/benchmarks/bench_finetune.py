"""Fine-tuning speed: forward+backward tokens/s through a swarm of real daemons vs the same training step locally.

Starts three servers (the model's blocks split in three) and a client daemon under a temp dir, then times one
training step (forward, loss, backward; no optimizer) of LoRA on q/v, of deep prompts and of input prompts, through
the swarm (with the servers keeping the forward's activations for the backward, and without: recomputed; and kept
through a second client daemon run with --pipeline-min-tokens 0, whose batches go hop after hop as one instead of as
a pipeline of micro-batches) and with transformers + PEFT in this process, all interleaved. Same threads, same
inputs. Prints one line per case.

    .venv/bin/python tests/benchmarks/bench_finetune.py                 # tiny random 30-block Llama
    .venv/bin/python tests/benchmarks/bench_finetune.py --model DIR     # e.g. SmolLM2-135M's model dir
    .venv/bin/python tests/benchmarks/bench_finetune.py --model DIR --batch 1 --tokens 128 --methods ptune --prompts 16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from petal.ctl.remote_model import RemoteModelForCausalLM
from tests.support.daemons import Swarm
from tests.support.tinymodels import tiny_llama


def timed(fns: list[Callable[[], None]], repeats: int) -> list[float]:
    """Median seconds of each function, run interleaved (one of each per round) after a warm-up."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir [a tiny random 30-block Llama]")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="lora,deep_ptune", help="comma-separated: lora, deep_ptune, ptune")
    ap.add_argument("--prompts", type=int, default=8, help="soft prompts of ptune and deep_ptune")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the daemons it starts inherit it: the same thread count
    root = Path(tempfile.mkdtemp(prefix="petal-bf-", dir="/tmp"))
    from transformers import AutoModelForCausalLM

    if args.model:
        path = Path(args.model)
    else:
        path = root / "tiny-llama"
        tiny_llama(num_hidden_layers=30, hidden_size=32, intermediate_size=64).save_pretrained(path)
    local = (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    )  # frozen, as served
    n = local.config.num_hidden_layers
    spans = [f"{n * i // 3}:{n * (i + 1) // 3}" for i in range(3)]
    swarm = Swarm(root)
    try:
        t0 = time.monotonic()
        boot = swarm.start_bootstrap("s0", "--serve", str(path), "--blocks", spans[0])
        for name, span in (("s1", spans[1]), ("s2", spans[2])):
            swarm.join(name, boot, "--serve", str(path), "--blocks", span)
        client = swarm.join("c", boot, "--codec", "none")
        in_turn = swarm.join("c2", boot, "--codec", "none", "--pipeline-min-tokens", "0")
        print(
            f"swarm of 3 servers + client up in {time.monotonic() - t0:.1f} s; blocks {spans}, "
            f"batch {args.batch} x {args.tokens} tokens, {args.threads} thread(s)"
        )
        x = torch.randint(
            0, local.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)
        )
        tokens = x.numel()
        for method in args.methods.split(","):
            remote, remote_in_turn = (
                RemoteModelForCausalLM.from_pretrained(path, c.socket, codec="none") for c in (client, in_turn)
            )
            for r in (remote, remote_in_turn):
                if method == "lora":
                    r.enable_lora(rank=8, alpha=16)
                else:
                    r.enable_ptune(args.prompts, deep=method == "deep_ptune")

            def swarm_step(keep: bool, remote: RemoteModelForCausalLM = remote) -> None:
                remote.keep_activations = keep
                remote(x, labels=x).loss.backward()

            ref = _local_reference(local, method, args.prompts)

            def local_step(ref: Callable[[torch.Tensor], object] = ref) -> None:
                ref(x)

            kept, recomputed, turn, loc = timed(
                [
                    lambda: swarm_step(True),
                    lambda: swarm_step(False),
                    lambda r=remote_in_turn: swarm_step(True, r),
                    local_step,
                ],
                args.repeats,
            )
            for name, s in (("kept", kept), ("recomputed", recomputed), ("kept, in turn", turn)):
                print(
                    f"{method:>10} {name:>13}: swarm {tokens / s:8.1f} tokens/s ({s * 1000:.0f} ms/step)   local "
                    f"{tokens / loc:8.1f} tokens/s ({loc * 1000:.0f} ms/step)   swarm/local {loc / s:.2f}"
                )
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


def _local_reference(model, method: str, n_prompts: int = 8):
    """One local training step of the same method: LoRA through PEFT, deep prompts through layer pre-hooks."""
    if method == "lora":
        import copy

        from peft import LoraConfig, get_peft_model

        peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0))

        def step(x: torch.Tensor) -> None:
            peft(input_ids=x, labels=x).loss.backward()

        return step
    hidden = model.config.hidden_size
    prompts = torch.zeros(n_prompts, hidden, requires_grad=True)
    deep = torch.zeros(model.config.num_hidden_layers, n_prompts, hidden, requires_grad=method == "deep_ptune")
    from tests.support.torchref import deep_prompts

    def step(x: torch.Tensor) -> None:
        emb = torch.cat([prompts[None].expand(x.shape[0], -1, -1), model.model.embed_tokens(x)], dim=1)
        with deep_prompts(model, deep) if method == "deep_ptune" else contextlib.nullcontext():
            logits = model(inputs_embeds=emb).logits[:, n_prompts:]
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()

    return step


if __name__ == "__main__":
    main()
