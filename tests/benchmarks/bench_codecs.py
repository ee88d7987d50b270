"""Wire codec figures: bytes per element, error and speed for each codec on hidden-state-like tensors.

Run: .venv/bin/python tests/benchmarks/bench_codecs.py [--write-docs]
Prints a markdown table; with --write-docs, replaces the "## Wire codecs" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from petal.protocol.frames import pack_message, unpack_message
from petal.protocol.tensors import decode_tensor, encode_tensor

SHAPE = (1, 128, 576)
OUTLIER_CHANNELS = (17, 204, 333, 498)
ROOT = Path(__file__).resolve().parents[2]
NOTES = """Reading the table:
- Why dynamic q8 for hidden states: with outlier channels, a linear int8 grid scaled to a 24,000 outlier
  rounds every ordinary value in that block to 0. The dynamic code keeps them: mean error on the
  non-outlier values is 6.6x lower than naive int8 at block 64 and 15x lower than at block 4096, for
  the same bytes. On plain N(0,1) without outliers, linear int8 is ~1.5x more accurate; hidden
  states are not like that.
- The q8 max error on the outlier tensor (227.5) is bitsandbytes' asymmetric code: its most negative
  entry is -0.993, so a negative block maximum comes back 0.7 % smaller. The positive maximum is exact.
- q8 is ~1.06 bytes per element at block 64 (1 code byte + 4 absmax bytes per 64 elements), 3.8x
  smaller than float32 and 1.9x smaller than float16.
"""


def hidden_like(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """N(0,1) with a few channels near ±24,000, like SmolLM2's residual stream; returns (x, outlier mask)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    for c in OUTLIER_CHANNELS:
        sign = 1.0 if c % 2 else -1.0
        x[..., c] = sign * 24000.0 * (1 + 0.1 * torch.randn(SHAPE[:-1], generator=g))
        mask[..., c] = True
    return x, mask


def plain(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.zeros(SHAPE, dtype=torch.bool)


def linear_int8_encode(x: torch.Tensor, block: int) -> dict[str, object]:
    """Naive blockwise absmax int8 (round(x / absmax * 127)), the baseline the dynamic code beats."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-30)
    q = torch.round(blocks / absmax[:, None] * 127).to(torch.int8).view(-1)[: flat.numel()]
    return {"shape": list(x.shape), "block": block, "data": q.numpy().tobytes(), "absmax": absmax.numpy().tobytes()}


def linear_int8_decode(obj: dict[str, object]) -> torch.Tensor:
    block = int(obj["block"])  # type: ignore[call-overload]
    q = torch.frombuffer(bytearray(obj["data"]), dtype=torch.int8).float()  # type: ignore[arg-type]
    absmax = torch.frombuffer(bytearray(obj["absmax"]), dtype=torch.float32)  # type: ignore[arg-type]
    pad = (-q.numel()) % block
    out = torch.nn.functional.pad(q, (0, pad)).view(-1, block) * (absmax[:, None] / 127)
    return out.view(-1)[: q.numel()].view(obj["shape"])  # type: ignore[arg-type]


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(
    name: str,
    x: torch.Tensor,
    mask: torch.Tensor,
    enc: Callable[[], dict],
    dec: Callable[[dict], torch.Tensor],
    repeats: int,
) -> str:
    obj = enc()
    wire = len(pack_message(obj))
    y = dec(unpack_message(pack_message(obj))).float()
    err = (x - y).abs()
    rel = (torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(x)).item()
    normal = err[~mask]
    mb = x.numel() * 4 / 1e6
    t_enc, t_dec = timed(enc, repeats), timed(lambda: dec(obj), repeats)
    return (
        f"| {name} | {wire / x.numel():.3f} | {err.max().item():.4g} | {err.mean().item():.4g} | "
        f"{normal.mean().item():.4g} | {rel:.2e} | {mb / t_enc:.0f} | {mb / t_dec:.0f} |"
    )


def table(repeats: int) -> str:
    lines = []
    for label, (x, mask) in (
        ("hidden states with outliers (±24,000 in 4 of 576 channels)", hidden_like()),
        ("plain N(0,1)", plain()),
    ):
        lines += [
            f"**{label}**, float32 {list(SHAPE)}",
            "",
            "| codec | bytes/elem on wire | max abs err | mean abs err | mean abs err, non-outlier | rel L2 err "
            "| encode MB/s | decode MB/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        cases: list[tuple[str, Callable[[], dict], Callable[[dict], torch.Tensor]]] = [
            ("none", lambda x=x: encode_tensor(x), decode_tensor),
            ("float16", lambda x=x: encode_tensor(x, "float16"), decode_tensor),
            ("bfloat16", lambda x=x: encode_tensor(x, "bfloat16"), decode_tensor),
            ("q8 dynamic, block 64", lambda x=x: encode_tensor(x, "q8"), decode_tensor),
            ("q8 dynamic, block 4096", lambda x=x: encode_tensor(x, "q8", block=4096), decode_tensor),
            ("naive absmax int8, block 64", lambda x=x: linear_int8_encode(x, 64), linear_int8_decode),
            ("naive absmax int8, block 4096", lambda x=x: linear_int8_encode(x, 4096), linear_int8_decode),
        ]
        lines += [row(name, x, mask, enc, dec, repeats) for name, enc, dec in cases]
        lines.append("")
    return "\n".join(lines)


def write_docs(body: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = (
        f"## Wire codecs\n\nMeasured with `.venv/bin/python tests/benchmarks/bench_codecs.py --write-docs` "
        f"(torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); speeds are medians of MB of "
        f"float32 input per second for encode_tensor/decode_tensor, bytes include msgpack overhead).\n\n{body}\n{NOTES}"
    )
    pattern = re.compile(r"^## Wire codecs\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads; 1 keeps figures stable on a shared machine"
    )
    parser.add_argument("--write-docs", action="store_true", help="update the section in docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    body = table(args.repeats)
    print(body)
    if args.write_docs:
        write_docs(body)
        print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
