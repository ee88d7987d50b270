"""Fine-tuning over the swarm from prompt/completion pairs: the loop behind `petalctl finetune`.

Data is JSON lines `{"prompt": ..., "completion": ...}`; the loss is next-token cross-entropy on the completion
tokens only (the prompt tokens get label -100), with the end-of-sequence token appended to each completion so
that the tuned model learns where to stop. Only client-owned parameters are trained: soft prompts or LoRA.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from petal.protocol.stops import find_stop, held_back

from .ptune import PROMPTS_FILE, load_prompts
from .remote_model import RemoteModelForCausalLM

__all__ = [
    "METHODS",
    "Example",
    "FinetuneConfig",
    "load_adapter",
    "load_jsonl",
    "make_batch",
    "save_adapter",
    "tokenize_pairs",
    "train",
]

METHODS = ("ptune", "deep_ptune", "lora")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken (prompt tokens)


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = "ptune"
    steps: int = 100
    lr: float = 1e-2
    batch_size: int = 8
    prompt_len: int = 16
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    seed: int = 0

    def validate(self) -> FinetuneConfig:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("steps", "batch_size", "prompt_len", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        return self


def load_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs; the error names the line that is not `{"prompt": str, "completion": str}`."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("prompt"), str)
            or not isinstance(obj.get("completion"), str)
        ):
            raise ValueError(f'{path}:{n}: each line must be {{"prompt": "...", "completion": "..."}}')
        pairs.append((obj["prompt"], obj["completion"]))
    if not pairs:
        raise ValueError(f"{path} has no examples")
    return pairs


def tokenize_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], eos_token_id: int | None, max_length: int = 512
) -> list[Example]:
    """Prompt and completion tokenized separately and joined, so the boundary is exact; labels only on the latter."""
    out = []
    for prompt, completion in pairs:
        p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        if eos_token_id is not None:
            c.append(int(eos_token_id))
        ids = (p + c)[:max_length]
        labels = ([-100] * len(p) + c)[:max_length]
        out.append(Example(ids, labels))
    return out


def make_batch(examples: Sequence[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return ids, mask, labels


def prepare(model: RemoteModelForCausalLM, config: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Add the method's trainable parameters to `model` (unless it already has them) and return them."""
    if config.method in ("ptune", "deep_ptune"):
        prompts = model.prompts
        if prompts is None:
            prompts = model.enable_ptune(config.prompt_len, deep=config.method == "deep_ptune", seed=config.seed)
        return list(prompts.parameters())
    lora = model.lora
    if lora is None:
        torch.manual_seed(config.seed)
        lora = model.enable_lora(rank=config.rank, alpha=config.alpha, targets=config.targets)
    return list(lora.parameters())


def train(
    model: RemoteModelForCausalLM,
    examples: Sequence[Example],
    config: FinetuneConfig,
    on_step: Callable[[int, float], None] | None = None,
    pad_id: int = 0,
) -> list[float]:
    """`config.steps` AdamW steps on shuffled mini-batches; returns the loss of every step."""
    config.validate()
    params = prepare(model, config)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    order: list[int] = []
    losses = []
    for step in range(config.steps):
        if len(order) < config.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh * max(1, -(-config.batch_size // len(fresh)))
        picked, order = order[: config.batch_size], order[config.batch_size :]
        ids, mask, labels = make_batch([examples[i] for i in picked], pad_id)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def save_adapter(model: RemoteModelForCausalLM, out_dir: str | Path) -> Path:
    """Write what `model` trained (its prompts, or its LoRA as a PEFT adapter) into `out_dir`."""
    meta = {"model": model.model_name, "fingerprint": model.info.fingerprint}
    if model.prompts is not None:
        return model.prompts.save(out_dir, **meta)
    if model.lora is not None:
        from .adapters import save_adapter as save_peft

        lora = model.lora.for_blocks(0, model.num_blocks)
        assert lora is not None
        targets = sorted({p.rsplit(".", 1)[-1] for p in model.lora.paths})
        save_peft(
            lora,
            out_dir,
            base_model=str(model.info.path),
            rank=model.lora.rank,
            alpha=model.lora.alpha,
            targets=targets,
            family=str(model.config.model_type),
        )
        return Path(out_dir)
    raise ValueError("the model has neither prompts nor LoRA to save; train one first")


def load_adapter(model: RemoteModelForCausalLM, path: str | Path) -> str:
    """Apply the prompts or LoRA adapter saved in `path` to `model`; returns the method ("ptune", "lora", ...)."""
    path = Path(path)
    if (path / PROMPTS_FILE).is_file():
        prompts, meta = load_prompts(path, dtype=model.dtype)
        if meta.get("fingerprint") and meta["fingerprint"] != model.info.fingerprint:
            raise ValueError(
                f"the prompts in {path} were trained on another model (fingerprint {meta['fingerprint']}, "
                f"this one is {model.info.fingerprint})"
            )
        if prompts.deep and (prompts.start, prompts.end) != (model.start, model.end):
            raise ValueError(
                f"deep prompts in {path} cover blocks [{prompts.start}, {prompts.end}), the model runs "
                f"[{model.start}, {model.end})"
            )
        model.set_prompts(prompts)
        return prompts.method
    from .adapters import load_adapter as load_peft
    from .lora_weights import LoraWeights

    lora, config = load_peft(path)
    alpha = config.get("lora_alpha")
    model.set_lora(LoraWeights.from_lora(model.config, lora, alpha=None if alpha is None else float(alpha)))
    return "lora"


def load_tokenizer(model: RemoteModelForCausalLM) -> Any:
    """The model dir's tokenizer; the error says what to do when it has none."""
    path = model.info.path
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer; fine-tuning from text needs one (pull the full model)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def finetune_from_file(
    model: RemoteModelForCausalLM,
    data: str | Path,
    config: FinetuneConfig,
    out_dir: str | Path,
    on_step: Callable[[int, float], None] | None = None,
    max_length: int = 512,
) -> list[float]:
    """What `petalctl finetune` does: read the JSONL, tokenize, train, save the adapter into `out_dir`."""
    config.validate()
    tokenizer = load_tokenizer(model)
    eos = model._eos_ids(None)
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (min(eos) if eos else None)
    examples = tokenize_pairs(tokenizer, load_jsonl(data), eos_id, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_id or 0)
    losses = train(model, examples, config, on_step, pad_id=int(pad))
    save_adapter(model, out_dir)
    return losses


def generate_with_adapter(
    model_name: str,
    adapter: str | Path,
    prompt: str,
    *,
    socket: str | None = None,
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """Client-side generation with trained prompts or LoRA applied (the daemon's /v1/generate knows neither).

    One inference session carries the prompts or LoRA weights (sent once), so each token is one step, O(n).
    `on_text` gets each new piece of text as it is generated (held back while it could still start a stop
    sequence). Returns `{"text", "tokens", "method"}`; the text is cut before the first stop sequence. `opts`
    (`codec`, ...) go to every daemon call.
    """
    model = RemoteModelForCausalLM.from_pretrained(model_name, socket, **opts)
    method = load_adapter(model, adapter)
    tokenizer = load_tokenizer(model)
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    eos = model._eos_ids(None)
    new: list[int] = []
    shown, text = "", ""
    for nxt in model.iter_generate(
        torch.tensor([list(ids)]),
        max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    ):
        token = int(nxt[0])
        if token in eos:
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        cut = find_stop(text, stop)
        if cut is not None:
            text = text[:cut]
            break
        safe = len(text) - held_back(text, stop)
        if on_text is not None and safe > len(shown):
            on_text(text[len(shown) : safe])
            shown = text[:safe]
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown) :])
    return {"text": text, "tokens": new, "method": method}
