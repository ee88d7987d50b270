"""Local references for the torch client tests: the swarm's result must equal plain transformers (+ PEFT).

Also starts the swarm those tests share: three servers of 10 blocks of a tiny 30-block Llama, plus a client daemon
that serves nothing (the tests talk to it over its socket, as a user would).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tests.support.daemons import Daemon, Swarm

SPANS = ("0:10", "10:20", "20:30")


def start_swarm(swarm: Swarm, model_dir: Path) -> Daemon:
    """Three servers (one per span, started in parallel) and a client daemon; returns the client daemon."""
    serve = ("--serve", str(model_dir))
    boot = swarm.start_bootstrap("s0", *serve, "--blocks", SPANS[0])
    addr = boot.address
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [
            pool.submit(lambda n=n, b=b: swarm.make(n, "--initial-peer", addr, *serve, "--blocks", b).start())
            for n, b in (("s1", SPANS[1]), ("s2", SPANS[2]))
        ]
        futures.append(pool.submit(lambda: swarm.make("c", "--initial-peer", addr, "--codec", "none").start()))
        daemons = [f.result() for f in futures]
    return daemons[-1]


@contextmanager
def tiny_llama_swarm(prefix: str, name: str = "tiny-llama") -> Iterator[tuple[Path, nn.Module, Path]]:
    """A tiny random 30-block Llama saved as model dir ``name``, served by `start_swarm`: (model dir, the local
    transformers model, the client daemon's socket); everything is stopped and removed on exit."""
    from tests.support.tinymodels import tiny_llama

    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    ref = tiny_llama(num_hidden_layers=30, hidden_size=32, intermediate_size=64)
    ref.save_pretrained(root / name, safe_serialization=True)
    swarm = Swarm(root)
    try:
        client = start_swarm(swarm, root / name)
        yield root / name, ref, client.socket
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def deep_prompts(model: nn.Module, prompts: torch.Tensor) -> Iterator[None]:
    """Add `prompts[i]` ([P, H] or [B, P, H]) to the first P positions before layer i, as the servers do."""
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def pre(module: nn.Module, args: tuple, kwargs: dict, i: int = i) -> tuple[tuple, dict]:
            h = args[0] if args else kwargs["hidden_states"]
            p = prompts[i]
            h = torch.cat([h[:, : p.shape[-2]] + p, h[:, p.shape[-2] :]], dim=1)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def peft_key(key: str) -> str:
    """Our wire key -> PEFT's parameter name in a Llama PeftModel."""
    block, rest = key.split(".", 1)
    path, which = rest.rsplit(".", 1)
    return f"base_model.model.model.layers.{block}.{path}.{which}.default.weight"


def peft_llama(
    model: nn.Module, weights: dict[str, torch.Tensor], rank: int, alpha: float, targets: list[str]
) -> nn.Module:
    """A PEFT LoRA copy of `model` (dropout 0) holding exactly `weights` (our wire keys); other pairs stay zero."""
    from peft import LoraConfig, get_peft_model

    blocks = sorted({int(k.split(".", 1)[0]) for k in weights})
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, layers_to_transform=blocks)
    peft = get_peft_model(copy.deepcopy(model), config)
    result = peft.load_state_dict({peft_key(k): v.detach() for k, v in weights.items()}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return peft


def last_block_output(model: nn.Module, embeds: torch.Tensor, layers: nn.ModuleList) -> torch.Tensor:
    """What leaves the last of ``layers`` (before the final norm) in a full forward of ``model`` on ``embeds``: what
    a chain of served spans over all blocks returns."""
    seen: list[torch.Tensor] = []
    hook = layers[-1].register_forward_hook(lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        model(inputs_embeds=embeds)
    finally:
        hook.remove()
    return seen[0]


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5) -> None:
    """``max |ours - ref| <= atol * max(1, max |ref|)``, printing the figure."""
    diff, scale = (ours - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    print(f"\n{name}: max |diff| {diff:.3e} (max |ref| {scale:.2f})")
    assert diff <= atol * scale, f"{name}: max |diff| {diff} > {atol} x {scale}"
