"""`petald pull ORG/NAME`: fetch from the Hugging Face Hub only the bytes this daemon needs.

A server of blocks [a, b) needs config, tokenizer and those blocks' tensors; a client needs the embeddings, final
norm and head (every tensor outside the blocks). Everything goes through the real `huggingface_hub` client
(`HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` work as usual): small files and shards made only of needed tensors
with `hf_hub_download`, the rest as HTTP byte ranges of the safetensors files, located through their headers.

The model dir keeps each shard under its own name, with its full header and every tensor at its original offset;
bytes that were not fetched are holes of a sparse file (no disk used). Besides the needed tensors, the first and
last `SAMPLE_BYTES` of every other tensor are fetched: they are what `petal.kernels.store` hashes into the model's
fingerprint, so a partial dir has the same fingerprint as the whole model and joins the same swarm. What a dir
holds (blocks, client parts, commit) is recorded in `petal-source.json`; `blocks_missing` tells a caller that
wants to serve blocks the dir does not hold (their tensors would read as zeros).

Resuming: each completed byte range (at most `CHUNK_BYTES`) is journaled in `.petal-pull/done.json`, so a pull
that was interrupted continues where it stopped; `hf_hub_download` resumes its own files.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHUNK_BYTES",
    "SAMPLE_BYTES",
    "SOURCE_FILE",
    "HubPullError",
    "Want",
    "blocks_missing",
    "client_missing",
    "parse_size",
    "pull_hub",
    "read_source",
]

SOURCE_FILE = "petal-source.json"  # written last: what the dir holds
SAMPLE_BYTES = 4096  # = petal.kernels.store.FINGERPRINT_SAMPLE_BYTES (a test checks); kept here: no torch import
CHUNK_BYTES = 64 << 20  # a journaled range is at most this long: an interrupted pull refetches at most one chunk
WORK_DIR = ".petal-pull"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SMALL_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")  # config, tokenizer, generation settings
BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")  # model.layers.3.mlp..., transformer.h.3...
REPO_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubPullError(RuntimeError):
    """A Hub pull failed or was refused; the message says what to do next."""


@dataclass(frozen=True)
class Want:
    """What this daemon needs: blocks [start, end) (None: no blocks; `all_blocks`: every block) and/or client parts."""

    blocks: tuple[int, int] | None = None
    client: bool = False
    all_blocks: bool = False


def parse_size(text: str) -> int:
    """'500M', '20G', '1.5GiB', '123' (bytes) -> bytes; powers of 1024."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise HubPullError(f"--max-disk {text!r} is not a size; write e.g. 500M, 20G or a byte count")
    scale = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * scale)


def read_source(model_dir: Path) -> dict[str, Any] | None:
    """The dir's `petal-source.json`, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(model_dir) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def blocks_missing(model_dir: Path, start: int, end: int) -> list[int]:
    """Blocks of [start, end) a partial Hub pull in `model_dir` does not hold (empty for any other dir)."""
    source = read_source(model_dir)
    if source is None or source.get("source") != "hub" or "blocks" not in source:
        return []
    held = {b for a, z in source["blocks"] for b in range(a, z)}
    return [b for b in range(start, end) if b not in held]


def client_missing(model_dir: Path) -> bool:
    """True when `model_dir` is a Hub pull without the client parts (embeddings, norm, head)."""
    source = read_source(model_dir)
    return source is not None and source.get("source") == "hub" and not source.get("client", True)


def pull_hub(
    repo_id: str,
    want: Want,
    models_dir: Path,
    *,
    revision: str | None = None,
    max_disk: int | None = None,
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> Path:
    """Make `models_dir/ORG/NAME` hold what `want` asks for and return it (see the module docstring)."""
    if not REPO_RE.match(repo_id) or ".." in repo_id:
        raise HubPullError(f"{repo_id!r} is not a Hub repo id; write ORG/NAME, e.g. HuggingFaceTB/SmolLM2-135M")
    target = Path(models_dir) / repo_id
    return _Pull(repo_id, want, target, revision, max_disk, _Reporter(progress, on_stage)).run()


class _Reporter:
    """Progress on stderr (and to `on_stage`): one line per stage, and byte counts while weights download."""

    def __init__(self, show: bool, on_stage: Callable[[str], None] | None) -> None:
        self.show = show
        self.on_stage = on_stage
        self.total = 0
        self.done = 0
        self.last = 0.0

    def stage(self, text: str) -> None:
        if self.on_stage is not None:
            self.on_stage(text)
        if self.show:
            print(f"petald pull: {text}", file=sys.stderr, flush=True)

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.show and (now - self.last > 1.0 or self.done >= self.total):
            self.last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            print(f"petald pull: {_mb(self.done)} of {_mb(self.total)} ({pct:.0f}%)", file=sys.stderr, flush=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass
class _Shard:
    name: str
    size: int
    header_len: int
    tensors: dict[str, tuple[int, int]]  # name -> absolute [begin, end) in the file


class _Pull:
    def __init__(
        self, repo_id: str, want: Want, target: Path, revision: str | None, max_disk: int | None, report: _Reporter
    ) -> None:
        self.repo_id, self.want, self.target, self.revision = repo_id, want, target, revision
        self.max_disk, self.report = max_disk, report
        self.work = target / WORK_DIR
        self.source = read_source(target) or {}

    # -- the steps ------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        from huggingface_hub import constants
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # one bar per byte range would flood stderr; _Reporter shows the whole pull
        if self.source and self.source.get("source") != "hub":
            raise HubPullError(f"{self.target} exists and is not a Hub pull; remove it or pull into another models dir")
        if constants.is_offline_mode():
            return self._offline("HF_HUB_OFFLINE is set")
        try:
            commit, files = self._resolve()
        except HubPullError:
            raise
        except Exception as e:  # noqa: BLE001 - no Hub reachable: what is cached may still do
            if self._covered():
                self.report.stage(f"the Hub is unreachable ({type(e).__name__}); using {self.target} as cached")
                return self.target
            raise HubPullError(self._hub_error(e)) from None
        held_commit = self.source.get("commit")
        if held_commit and held_commit != commit:
            raise HubPullError(
                f"{self.target} holds commit {held_commit[:12]} of {self.repo_id} but {self.revision or 'main'} is now "
                f"{commit[:12]}; pass --revision {held_commit[:12]} to keep it, or remove the dir to pull the new one"
            )
        self.target.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(exist_ok=True)
        try:
            return self._pull(commit, files)
        except HubPullError:
            raise
        except Exception as e:  # noqa: BLE001 - the Hub client's many errors: one message with the way forward
            raise HubPullError(self._hub_error(e) + "; run the same pull again to continue where it stopped") from None

    def _resolve(self) -> tuple[str, dict[str, int | None]]:
        """The commit sha the revision points to, and the repo's files with their sizes (one API call)."""
        from huggingface_hub import HfApi

        info = HfApi().model_info(self.repo_id, revision=self.revision, files_metadata=True)
        if not info.sha:
            raise HubPullError(f"the Hub gave no commit for {self.repo_id}@{self.revision or 'main'}")
        return info.sha, {s.rfilename: s.size for s in (info.siblings or [])}

    def _pull(self, commit: str, files: dict[str, int | None]) -> Path:
        small = sorted(f for f in files if "/" not in f and f.endswith(SMALL_SUFFIXES))
        if "config.json" not in small:
            raise HubPullError(f"{self.repo_id} has no config.json; it is not a transformers model repo")
        if INDEX_FILE not in files and SINGLE_FILE not in files:
            raise HubPullError(
                f"{self.repo_id} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); petal pulls only "
                "safetensors (for a .gguf file, pull its path or URL)"
            )
        self.report.stage(f"fetching config and tokenizer of {self.repo_id}@{commit[:12]}")
        for name in small:
            self._download(name, commit)
        config = json.loads((self.target / "config.json").read_text())
        num_blocks = _num_blocks(config)
        want_blocks = (0, num_blocks) if self.want.all_blocks else self.want.blocks
        if want_blocks is not None and not 0 <= want_blocks[0] < want_blocks[1] <= num_blocks:
            raise HubPullError(f"--blocks {want_blocks[0]}:{want_blocks[1]} is outside the model's {num_blocks} blocks")

        shard_names = self._shard_names()
        self.report.stage(f"reading the headers of {len(shard_names)} safetensors file(s)")
        shards = [self._header(name, commit, files.get(name)) for name in shard_names]
        blocks = _merge([*(tuple(b) for b in self.source.get("blocks", [])), *([want_blocks] if want_blocks else [])])
        client = bool(self.source.get("client")) or self.want.client
        needed = _needed_tensors(shards, blocks, client, num_blocks)

        plan = self._plan(shards, needed)
        small_bytes = sum(files.get(n) or 0 for n in small)
        final_bytes = small_bytes + sum(p[1] for p in plan.values())
        if self.max_disk is not None and final_bytes > self.max_disk:
            raise HubPullError(
                f"{self.repo_id} {_describe(blocks, client)} needs {_mb(final_bytes)} on disk, more than --max-disk "
                f"{_mb(self.max_disk)}; pull fewer blocks (--blocks A:B) or raise --max-disk"
            )
        todo = {name: ranges for name, (ranges, _) in plan.items() if ranges}
        new_bytes = sum(b - a for ranges in todo.values() for a, b in ranges)
        free = shutil.disk_usage(self.target).free
        if new_bytes > free:
            raise HubPullError(f"{_mb(new_bytes)} to download but only {_mb(free)} free under {self.target}")

        self.report.stage(f"downloading {_mb(new_bytes)} for {_describe(blocks, client)}")
        self.report.total = new_bytes
        by_name = {s.name: s for s in shards}
        for name, ranges in todo.items():
            if ranges == [(0, by_name[name].size)] and not (self.target / name).exists():
                self._download(name, commit)  # a whole shard of needed tensors: the ordinary download
                self._journal(name, ranges)
                self.report.add(by_name[name].size)
            else:
                self._fetch_ranges(by_name[name], commit, ranges)

        config["petal_name"] = self.repo_id  # the swarm-wide name: `-m ORG/NAME` finds this dir
        _write_json(self.target / "config.json", config)
        source = {
            "source": "hub",
            "repo": self.repo_id,
            "revision": self.revision or "main",
            "commit": commit,
            "num_blocks": num_blocks,
            "blocks": [list(b) for b in blocks],
            "client": client,
            "bytes": final_bytes,
        }
        _write_json(self.target / SOURCE_FILE, source)
        self.report.stage(f"done: {self.target} holds {_describe(blocks, client)}")
        return self.target

    def _offline(self, why: str) -> Path:
        if self._covered():
            return self.target
        held = _describe([tuple(b) for b in self.source.get("blocks", [])], bool(self.source.get("client")))
        raise HubPullError(
            f"{why} and {self.target} does not hold what was asked "
            f"({'it holds ' + held if self.source else 'nothing is cached'}); unset HF_HUB_OFFLINE to download it"
        )

    def _covered(self) -> bool:
        """True when the dir already holds everything `want` asks for (at the asked revision, if any)."""
        s = self.source
        if not s or (self.revision and self.revision not in (s.get("revision"), s.get("commit"))):
            return False
        if self.want.client and not s.get("client"):
            return False
        want = (0, int(s.get("num_blocks", 0))) if self.want.all_blocks else self.want.blocks
        return want is None or not blocks_missing(self.target, *want)

    # -- files and ranges -----------------------------------------------------------------------------------------

    def _download(self, name: str, commit: str) -> None:
        from huggingface_hub import hf_hub_download

        hf_hub_download(self.repo_id, name, revision=commit, local_dir=self.target)

    def _shard_names(self) -> list[str]:
        if (self.target / INDEX_FILE).is_file():
            index = json.loads((self.target / INDEX_FILE).read_text())
            return sorted(set(index.get("weight_map", {}).values()))
        return [SINGLE_FILE]

    def _header(self, name: str, commit: str, size: int | None) -> _Shard:
        """A shard's header, fetched with two small range requests (and kept in the work dir for later pulls)."""
        cached = self.work / "headers" / f"{name}.json"
        if cached.is_file():
            raw = json.loads(cached.read_text())
            return _Shard(name, raw["size"], raw["header_len"], {k: tuple(v) for k, v in raw["tensors"].items()})
        (header_len,) = struct.unpack("<Q", self._get(name, commit, 0, 8))
        header = json.loads(self._get(name, commit, 8, 8 + header_len))
        tensors = {}
        for tname, meta in header.items():
            if tname != "__metadata__":
                begin, end = meta["data_offsets"]
                tensors[tname] = (8 + header_len + begin, 8 + header_len + end)
        end_of_data = max((e for _, e in tensors.values()), default=8 + header_len)
        shard = _Shard(name, size or end_of_data, header_len, tensors)
        cached.parent.mkdir(parents=True, exist_ok=True)
        raw = {"size": shard.size, "header_len": header_len, "tensors": tensors}
        _write_json(cached, raw)
        return shard

    def _get(self, name: str, commit: str, begin: int, end: int) -> bytes:
        buf = io.BytesIO()
        self._http_range(name, commit, begin, end, buf)
        return buf.getvalue()

    def _http_range(self, name: str, commit: str, begin: int, end: int, out: Any) -> None:
        """Bytes [begin, end) of the file, written to `out` at its position; the Hub client's GET (token, retries)."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(self.repo_id, name, revision=commit)
        headers = {**build_hf_headers(), "Range": f"bytes={begin}-{end - 1}"}
        http_get(url, out, headers=headers, expected_size=end - begin, displayed_filename=name)

    def _plan(self, shards: list[_Shard], needed: set[str]) -> dict[str, tuple[list[tuple[int, int]], int]]:
        """Per shard: the byte ranges still to fetch, and the bytes the shard holds once they are."""
        done = self._done()
        plan = {}
        for shard in shards:
            ranges = [(0, 8 + shard.header_len)]  # the header: the store reads it
            for tname, (begin, end) in shard.tensors.items():
                if end == begin:
                    continue
                if tname in needed:
                    ranges.append((begin, end))
                else:  # the fingerprint's samples of every tensor
                    n = min(SAMPLE_BYTES, end - begin)
                    ranges += [(begin, begin + n), (end - n, end)]
            merged = _merge(ranges)
            held = sum(b - a for a, b in merged)
            plan[shard.name] = (_subtract(merged, done.get(shard.name, [])), held)
        return plan

    def _fetch_ranges(self, shard: _Shard, commit: str, ranges: list[tuple[int, int]]) -> None:
        path = self.target / shard.name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "r+b" if path.exists() else "w+b") as f:
            if os.fstat(f.fileno()).st_size != shard.size:
                f.truncate(shard.size)  # sparse: bytes never fetched take no disk
            for begin, end in ranges:
                for a in range(begin, end, CHUNK_BYTES):
                    b = min(end, a + CHUNK_BYTES)
                    f.seek(a)
                    self._http_range(shard.name, commit, a, b, f)
                    f.flush()
                    os.fsync(f.fileno())
                    self._journal(shard.name, [(a, b)])
                    self.report.add(b - a)

    def _done(self) -> dict[str, list[tuple[int, int]]]:
        try:
            raw = json.loads((self.work / "done.json").read_text())
        except (OSError, ValueError):
            return {}
        return {k: [(a, b) for a, b in v] for k, v in raw.items()}

    def _journal(self, name: str, ranges: Iterable[tuple[int, int]]) -> None:
        done = self._done()
        done[name] = _merge([*done.get(name, []), *ranges])
        _write_json(self.work / "done.json", {k: [list(r) for r in v] for k, v in done.items()})

    def _hub_error(self, e: Exception) -> str:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        if isinstance(e, GatedRepoError):
            return f"{self.repo_id} is gated: accept its license on the Hub and set HF_TOKEN to a token with access"
        if isinstance(e, RepositoryNotFoundError):
            return f"no repo {self.repo_id} on the Hub (or it is private: set HF_TOKEN)"
        if isinstance(e, RevisionNotFoundError):
            return f"{self.repo_id} has no revision {self.revision!r}"
        return (
            f"could not pull {self.repo_id} ({type(e).__name__}: {str(e)[:300]}); is the Hub (HF_ENDPOINT) reachable?"
        )


def _num_blocks(config: dict[str, Any]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    text = config.get("text_config")
    if isinstance(text, dict):
        return _num_blocks(text)
    raise HubPullError("config.json has no num_hidden_layers; petal cannot tell the model's blocks apart")


def _needed_tensors(shards: list[_Shard], blocks: list[tuple[int, int]], client: bool, num_blocks: int) -> set[str]:
    """Tensors of the wanted blocks, plus every tensor outside the blocks when the client parts are wanted."""
    needed = set()
    seen_blocks = set()
    for shard in shards:
        for name in shard.tensors:
            m = BLOCK_RE.search(name)
            if m is None:
                if client:
                    needed.add(name)
                continue
            index = int(m.group(1))
            seen_blocks.add(index)
            if any(a <= index < b for a, b in blocks):
                needed.add(name)
    if seen_blocks and seen_blocks != set(range(num_blocks)):
        raise HubPullError(
            f"the checkpoint's tensor names show blocks {min(seen_blocks)}..{max(seen_blocks)} but config.json says "
            f"{num_blocks}; petal cannot tell which tensors belong to which block"
        )
    return needed


def _describe(blocks: Iterable[tuple[int, int]], client: bool) -> str:
    parts = [f"blocks {a}:{b}" for a, b in blocks] + (["the client parts"] if client else [])
    return " and ".join(parts) or "config and tokenizer only"


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted((r[0], r[1]) for r in ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _subtract(ranges: list[tuple[int, int]], done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        pieces = [(a, b)]
        for x, y in done:
            pieces = [p for s, e in pieces for p in ((s, min(e, x)), (max(s, y), e)) if p[0] < p[1]]
        out += pieces
    return out


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): a killed pull never leaves half a file that a later run trusts."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
