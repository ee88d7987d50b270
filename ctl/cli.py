"""`petalctl`: the command line for a local petald, over its Unix socket.

Exit codes: 0 success, 1 the daemon answered with an error, 2 no daemon reachable (or a usage error).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from rich.console import Console
from rich.table import Table

from .client import Client, DaemonError

console = Console()


class Ctx:
    def __init__(self, socket: str | None, as_json: bool) -> None:
        self.client = Client(socket)
        self.as_json = as_json


def _fail(e: DaemonError) -> None:
    click.echo(f"error: {e.message}", err=False)
    sys.exit(2 if e.code == "unavailable" and e.status is None else 1)


def _call(ctx: Ctx, method: str, path: str, body: Any = None) -> Any:
    try:
        return ctx.client.request(method, path, body)
    except DaemonError as e:
        _fail(e)


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group()
@click.option("--socket", envvar="PETAL_SOCKET", help="The daemon's control socket [$PETAL_SOCKET or the default].")
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON (for scripts).")
@click.pass_context
def cli(ctx: click.Context, socket: str | None, as_json: bool) -> None:
    """Talk to the local petal daemon."""
    ctx.obj = Ctx(socket, as_json)


@cli.command()
@click.pass_obj
def status(ctx: Ctx) -> None:
    """This daemon: peer id, addresses, DHT peers, uptime."""
    st = _call(ctx, "GET", "/v1/status")
    if ctx.as_json:
        return _print_json(st)
    for key, value in st.items():
        if key == "links" and isinstance(value, dict):  # peer -> {reach, addr}: "a1b2c3d4 upgraded", ...
            value = [f"{peer[-8:]} {link.get('reach')}" for peer, link in value.items()] or "-"
        click.echo(f"{key:>12}: {', '.join(map(str, value)) if isinstance(value, list) else value}")


STATE_STYLES = {
    "online": "green",
    "joining": "yellow",
    "draining": "magenta",
    "unreachable": "dark_orange",
    "offline": "bright_black",
}
"""Colours of server and block states, as on the dashboard page."""


PIPED_WIDTH = 200
"""Columns of a table printed to a pipe or file: each row stays on one line for grep (a terminal's width binds)."""


def _table_console() -> Console:
    return console if console.is_terminal else Console(width=PIPED_WIDTH)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _who(server: dict[str, Any]) -> str:
    short = server.get("short_id") or server["peer_id"][-8:]
    return f"{server['public_name']} ({short})" if server.get("public_name") else short


def _state(state: str) -> str:
    return f"[{STATE_STYLES.get(state, 'default')}]{state}[/]"


def _block_map(blocks: list[str]) -> str:
    """One coloured square per block, in its state's colour."""
    return "".join(f"[{STATE_STYLES.get(b, 'default')}]\u25a0[/]" for b in blocks)


@cli.command()
@click.option("-m", "--model", help="Only this model [all models the swarm serves].")
@click.pass_obj
def swarm(ctx: Ctx, model: str | None) -> None:
    """Servers of each model: state, span, name, version, dtype, throughput, cache left, reach, round trip, health.

    The same facts as the dashboard page (`GET /`): both read /v1/dashboard, which --json prints.
    """
    out = _call(ctx, "GET", "/v1/dashboard" + (f"?model={quote(model)}" if model else ""))
    if ctx.as_json:
        return _print_json(out)
    if not out["models"]:
        click.echo("the swarm serves no model yet; start a server with `petald --serve MODEL ...`")
    show = _table_console()
    for m in out["models"]:
        health = "[green]healthy[/]" if m["healthy"] else "[red]broken[/]"
        title = f"{m['model']}: {health}, {m['num_blocks']} blocks, {m['family']}, fp {m['fingerprint']}"
        table = Table(title=title, title_justify="left")
        for col in (
            "peer",
            "name",
            "state",
            "blocks",
            "ver",
            "dtype/quant",
            "adapters",
            "tokens/s",
            "link",
            "cache left",
        ):
            table.add_column(col, justify="right" if col in ("tokens/s", "cache left", "ver") else "left")
        table.add_column("reach")
        table.add_column("RTT ms", justify="right")
        table.add_column("reports", justify="right")
        for s in m["servers"]:
            link = "-" if s.get("link_mbit") is None else f"{s['link_mbit']} Mbit/s"
            table.add_row(
                s["short_id"],
                s["public_name"] or "-",
                _state(s["state"]),
                f"{s['start']}:{s['end']}",
                str(s["version"]),
                f"{s['dtype']}/{s['quant']}",
                ", ".join(s.get("adapters") or []) or "-",
                f"{s['throughput']:.1f}",
                link,
                str(s["cache_tokens_left"]),
                s["reach"] + (" tls" if s["tls"] else ""),
                _ms(s["rtt_s"]),
                f"[red]{s['reports']}[/red]" if s.get("reports") else "0",
            )
        show.print(table)
        show.print(f"blocks {_block_map(m['blocks'])}  " + "  ".join(_state(st) for st in STATE_STYLES))
        if m["uncovered"]:
            show.print(f"[red]no online server for blocks {', '.join(f'{a}:{b}' for a, b in m['uncovered'])}[/red]")
        if m["route"]:
            hops = " -> ".join(f"{h['start']}:{h['end']} on {_who(h)} ({_ms(h['rtt_s'])} ms)" for h in m["route"])
            show.print(f"route: {hops}")
        else:
            show.print(f"[red]route: {m['route_error']}[/red]")


@cli.command()
@click.option("-m", "--model", required=True, help="Model name.")
@click.pass_obj
def route(ctx: Ctx, model: str) -> None:
    """The chain of servers an inference session would take now."""
    out = _call(ctx, "GET", f"/v1/route?model={quote(model)}")
    if ctx.as_json:
        return _print_json(out)
    table = Table(title=f"route for {model}", title_justify="left")
    for col in ("blocks", "server span", "peer", "name", "reach", "RTT ms", "tokens/s"):
        table.add_column(col, justify="right" if col in ("RTT ms", "tokens/s") else "left")
    for h in out["chain"]:
        table.add_row(
            f"{h['start']}:{h['end']}",
            f"{h['server_span'][0]}:{h['server_span'][1]}",
            h["peer_id"][-8:],
            h.get("public_name") or "-",
            (h.get("reach") or "-") + (" (TLS)" if h.get("tls") else ""),
            _ms(h["latency_s"]),
            f"{h['throughput']:.1f}",
        )
    _table_console().print(table)


VERDICT_STYLES = {"pass": "green", "fail": "red", "disputed": "yellow", "unreachable": "dark_orange"}


@cli.command()
@click.option("-m", "--model", required=True, help="Model name.")
@click.option("--tokens", type=int, help="Tokens of the probe each span gets [8].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probe inputs.")
@click.option(
    "--report", is_flag=True, help="Publish a signed mismatch report in the DHT about each server that fails."
)
@click.pass_obj
def verify(ctx: Ctx, model: str, tokens: int | None, seed: int, report: bool) -> None:
    """Send the same probe to every server of every span (and this daemon's own blocks) and compare their outputs.

    Verdicts: pass, fail (disagrees with this daemon's blocks or with the majority), disputed (no majority to tell
    who is wrong), unreachable, unchecked (no other server of its blocks). Exit status 1 if any server fails.
    """
    try:
        out = ctx.client.verify(model, tokens=tokens, seed=seed, report=report)
    except DaemonError as e:
        _fail(e)
    if ctx.as_json:
        _print_json(out)
    else:
        ref = (
            "this daemon's own blocks where it hosts them, else the majority" if out["local_reference"] else "majority"
        )
        table = Table(title=f"verify {model} (fp {out['fingerprint']}; reference: {ref})", title_justify="left")
        for col in ("peer", "span", "rel L2", "top-k", "verdict"):
            table.add_column(col, justify="right" if col in ("rel L2", "top-k") else "left")
        for s in out["servers"]:
            rel = "-" if s["rel_l2"] is None else f"{s['rel_l2']:.2e}"
            topk = "-" if s["topk"] is None else f"{s['topk']:.2f}"
            verdict = s["verdict"]
            table.add_row(
                s["peer_id"][-8:],
                f"{s['start']}:{s['end']}",
                rel,
                topk,
                f"[{VERDICT_STYLES.get(verdict, 'default')}]{verdict}[/]",
            )
        console.print(table)
    if any(s["verdict"] == "fail" for s in out["servers"]):
        sys.exit(1)


@cli.command()
@click.option("--url", "url_only", is_flag=True, help="Print only the login URL.")
@click.pass_obj
def token(ctx: Ctx, url_only: bool) -> None:
    """The token of the daemon's TCP API (petald --http), and the URL that logs a browser in.

    Clients send it as `Authorization: Bearer TOKEN` (an OpenAI client's api_key). Read over the Unix socket, so
    any member of its group (e.g. `petal` under systemd) can get it.
    """
    out = _call(ctx, "GET", "/v1/http/token")
    if ctx.as_json:
        return _print_json(out)
    if url_only:
        return click.echo(out["url"])
    click.echo(f"token: {out['token']}")
    click.echo(f"login: {out['url']}")
    click.echo(f"  API: {out['http']}/v1 (send Authorization: Bearer TOKEN; OpenAI clients: api_key=TOKEN)")


# --- chat, serve, unserve, bench ------------------------------------------------------------------------------------


@cli.command()
@click.option("-m", "--model", required=True, help="Model name (pulled locally; the swarm serves its blocks).")
@click.option("--system", help="A system message that opens the conversation.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Per answer.")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, help="Repeatable sampling.")
@click.pass_obj
def chat(
    ctx: Ctx, model: str, system: str | None, max_new_tokens: int, temperature: float, top_p: float, seed: int | None
) -> None:
    """Talk with MODEL: each line you type is a user turn, answers stream back; /reset forgets, /exit or EOF ends.

    The whole conversation goes with every turn (the daemon applies the model's chat template), so the model
    sees what was said before.
    """
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    options: dict[str, Any] = {
        "max_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        **({"seed": seed} if seed is not None else {}),
    }
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"chatting with {model} through the swarm; /reset forgets the conversation, /exit ends", err=True)
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            if interactive:
                click.echo("", err=True)
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(opening)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = []
        try:
            for piece in ctx.client.chat(model, messages, **options):
                answer.append(piece)
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except DaemonError as e:
            click.echo("")
            _fail(e)
        click.echo("")
        messages.append({"role": "assistant", "content": "".join(answer)})


@cli.command()
@click.argument("model")
@click.option("--blocks", help="Serve blocks A:B (0-based, end exclusive).")
@click.option("--num-blocks", type=int, help="Serve this many blocks where the swarm's throughput is worst.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="Host a LoRA adapter (PEFT dir on the daemon's machine, NAME=DIR or DIR) on these blocks; repeatable.",
)
@click.pass_obj
def serve(ctx: Ctx, model: str, blocks: str | None, num_blocks: int | None, adapters: tuple[str, ...]) -> None:
    """Make this daemon host blocks of MODEL (all of them unless --blocks or --num-blocks), showing the loading;
    beside what it serves already (another model, or blocks of MODEL outside its spans). Requests pick a hosted
    adapter by name (`petalctl generate -m MODEL:NAME`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if blocks is not None and num_blocks is not None:
        click.echo("error: pass either --blocks A:B or --num-blocks N, not both")
        sys.exit(2)
    last: dict[str, Any] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), disable=ctx.as_json, transient=True) as progress:
            task = None
            for event in ctx.client.serve(model, blocks=blocks, num_blocks=num_blocks, adapters=adapters):
                last = event
                kind = event.get("event")
                if ctx.as_json:
                    click.echo(json.dumps(event))
                elif kind == "resolved":
                    task = progress.add_task(
                        f"loading {event['model']} blocks {event['start']}:{event['end']}",
                        total=event["end"] - event["start"],
                    )
                elif kind == "loading" and task is not None:
                    progress.update(task, completed=event.get("loaded", 0), total=event.get("total"))
                elif kind == "measuring" and task is not None:
                    progress.update(task, description="measuring throughput")
    except DaemonError as e:
        _fail(e)
    if last.get("event") != "serving":
        click.echo(
            f"error: the daemon stopped before serving {model} (last event: {json.dumps(last)}); "
            "see its log (`journalctl -u petald` or the terminal it runs in)"
        )
        sys.exit(1)
    if not ctx.as_json:
        click.echo(
            f"serving {last['model']} blocks {last['start']}:{last['end']} "
            f"({last.get('throughput', 0):.1f} tokens/s"
            + "".join(f"; adapter {name}: -m {last['model']}:{name}" for name in last.get("adapters") or [])
            + f"); `petalctl unserve {last['model']}` stops "
            f"(with --blocks {last['start']}:{last['end']} if it serves several spans of it)"
        )


@cli.command()
@click.argument("model")
@click.option("--blocks", help="The span A:B to stop, when this daemon serves several spans of MODEL.")
@click.pass_obj
def unserve(ctx: Ctx, model: str, blocks: str | None) -> None:
    """Stop hosting MODEL's blocks on this daemon (the swarm routes around them); other spans keep serving."""
    try:
        out = ctx.client.unserve(model, blocks)
    except DaemonError as e:
        _fail(e)
    if ctx.as_json:
        return _print_json(out)
    spans = ", ".join(f"{s['start']}:{s['end']}" for s in out["stopped"])
    click.echo(f"stopped serving {out['model']} blocks {spans}")


def _hidden_size(ctx: Ctx, model: str) -> int:
    """From the model's config.json in the daemon's local store (the bench needs no weights, only the width)."""
    entries = _call(ctx, "GET", "/v1/models")["data"]
    entry = next((m for m in entries if m["id"] == model), None)
    if entry is None:
        click.echo(f"error: the swarm serves no model {model!r}; see `petalctl models list`")
        sys.exit(1)
    path = entry.get("path")
    try:
        return int(json.loads((Path(path) / "config.json").read_text())["hidden_size"]) if path else 0
    except (OSError, ValueError, KeyError) as e:
        click.echo(f"error: cannot read {model}'s hidden size from {path}/config.json ({e}); pass --hidden-size")
        sys.exit(1)


@cli.command()
@click.option("-m", "--model", required=True, help="Model name.")
@click.option("--steps", type=int, default=32, show_default=True, help="Single-token decode steps to time.")
@click.option("--tokens", type=int, default=128, show_default=True, help="Tokens per row of the timed forward.")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option(
    "--codec",
    type=click.Choice(["auto", "none", "float16", "bfloat16", "q8"]),
    help="Wire codec [the daemon's --codec].",
)
@click.option("--hidden-size", type=int, help="The model's hidden size [read from the local model dir].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.pass_obj
def bench(
    ctx: Ctx,
    model: str,
    steps: int,
    tokens: int,
    batch: int,
    codec: str | None,
    hidden_size: int | None,
    seed: int,
    as_json: bool,
) -> None:
    """Time the swarm from here: decode steps/s (one token per step, KV cache on the servers) and forward tokens/s.

    Inputs are random hidden states of the model's width, so no weights are needed locally; one untimed step and
    one untimed forward come first (first passes are several times slower).
    """
    import time

    import torch

    as_json = as_json or ctx.as_json
    if min(steps, tokens, batch) < 1:
        click.echo("error: --steps, --tokens and --batch must be at least 1")
        sys.exit(2)
    hidden = hidden_size or _hidden_size(ctx, model)
    if hidden < 1:
        click.echo(
            f"error: {model} is not in this daemon's models dir, so its hidden size is unknown: "
            f"`petalctl models pull {model}` or pass --hidden-size"
        )
        sys.exit(1)
    opts: dict[str, Any] = {} if codec is None else {"codec": codec}
    gen = torch.Generator().manual_seed(seed)
    try:
        with ctx.client.open_session(model, max_length=steps + 1, batch=batch, **opts) as session:
            x = torch.randn(batch, 1, hidden, generator=gen)
            session.step(x)
            t0 = time.perf_counter()
            for _ in range(steps):
                session.step(x)
            decode_s = time.perf_counter() - t0
            route = session.route
        h = torch.randn(batch, tokens, hidden, generator=gen)
        ctx.client.forward(model, h, **opts)
        t0 = time.perf_counter()
        ctx.client.forward(model, h, **opts)
        forward_s = time.perf_counter() - t0
    except DaemonError as e:
        _fail(e)
    figures = {
        "model": model,
        "route": route,
        "hidden_size": hidden,
        "batch": batch,
        "codec": codec,
        "steps": steps,
        "decode_steps_per_s": steps / decode_s,
        "decode_ms_per_step": 1000 * decode_s / steps,
        "tokens": tokens,
        "forward_s": forward_s,
        "forward_tokens_per_s": batch * tokens / forward_s,
    }
    if as_json:
        return _print_json(figures)
    click.echo("route: " + " -> ".join(f"{h['start']}:{h['end']}@{h['peer'][-8:]}" for h in route))
    click.echo(
        f"decode:  {figures['decode_steps_per_s']:8.2f} steps/s ({figures['decode_ms_per_step']:.1f} ms/step, "
        f"{steps} steps, batch {batch})"
    )
    click.echo(
        f"forward: {figures['forward_tokens_per_s']:8.1f} tokens/s ({batch} x {tokens} tokens in {forward_s:.3f} s)"
    )


@cli.command()
@click.option("-m", "--model", required=True, help="Model name (pulled locally; the swarm serves its blocks).")
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, help="Repeatable sampling.")
@click.option("--stop", multiple=True, help="Stop before this text (repeatable).")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message with the model's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the NDJSON stream as it comes.")
@click.option(
    "--codec",
    type=click.Choice(["auto", "none", "float16", "bfloat16", "q8"]),
    help="Wire codec between the daemon and the servers [the daemon's --codec, auto: exact float32 (none), "
    "or q8 on links measured slow].",
)
@click.option(
    "--speculative",
    type=click.IntRange(0, 16),
    help="Greedy only: guess up to this many tokens by prompt lookup and check them in one swarm step (same tokens).",
)
@click.option(
    "--num-beams", type=click.IntRange(1, 16), help="Beam search (greedy); prints the best beam when it is known."
)
@click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    help="Apply prompts or a LoRA adapter from `petalctl finetune` (sampled here, streamed; the session carries "
    "the adapter, sent once).",
)
@click.pass_obj
def generate(
    ctx: Ctx, /, model: str, prompt: str, as_json: bool, stop: tuple[str, ...], adapter: str | None, **options: Any
) -> None:
    """Generate text from PROMPT through the swarm, streaming tokens as they come."""
    as_json = as_json or ctx.as_json
    for key in ("codec", "speculative", "num_beams"):
        if options.get(key) is None:
            options.pop(key, None)
    if adapter is not None:
        if "speculative" in options or "num_beams" in options:
            click.echo("error: --speculative and --num-beams do not apply with --adapter yet; drop one")
            sys.exit(2)
        return _generate_with_adapter(ctx, model, prompt, adapter, as_json, stop, options)
    try:
        for line in ctx.client.generate(model, prompt, stop=list(stop), **options):
            if as_json:
                click.echo(json.dumps(line))
            elif line.get("done"):
                click.echo("")
            else:
                click.echo(line.get("text", ""), nl=False)
                sys.stdout.flush()
    except DaemonError as e:
        if not as_json:
            click.echo("")
        _fail(e)


@cli.group()
def models() -> None:
    """Models the swarm serves, and pulling them locally."""


@models.command("list")
@click.pass_obj
def models_list(ctx: Ctx) -> None:
    out = _call(ctx, "GET", "/v1/models")
    if ctx.as_json:
        return _print_json(out)
    table = Table(title="models in the swarm")
    for col in ("model", "family", "blocks", "servers", "fingerprint"):
        table.add_column(col)
    for m in out["data"]:
        table.add_row(
            m["id"],
            m.get("family", ""),
            str(m.get("num_blocks", "")),
            str(m.get("servers", "")),
            m.get("fingerprint", ""),
        )
    console.print(table)


@models.command("pull")
@click.argument("name")
@click.pass_obj
def models_pull(ctx: Ctx, name: str) -> None:
    """Download NAME into the daemon's models dir (needed to generate with it: the head runs locally)."""
    if ctx.as_json:
        return _print_json(_call(ctx, "POST", "/v1/models/pull", {"name": name}))
    out: dict[str, Any] = {}
    try:
        with Console(stderr=True).status(f"pulling {name}") as status:
            for event in ctx.client.stream("POST", "/v1/models/pull", {"name": name, "stream": True}):
                if event.get("event") == "stage":
                    status.update(f"pulling {name}: {event['text']}")
                else:
                    out = event
    except DaemonError as e:
        _fail(e)
    click.echo(f"{out.get('name', name)} is in {out.get('path')}")


def _generate_with_adapter(
    ctx: Ctx, model: str, prompt: str, adapter: str, as_json: bool, stop: tuple[str, ...], options: dict[str, Any]
) -> None:
    from .finetune import generate_with_adapter

    def show(piece: str) -> None:
        if as_json:
            click.echo(json.dumps({"text": piece}))
        else:
            click.echo(piece, nl=False)
            sys.stdout.flush()

    try:
        out = generate_with_adapter(
            model, adapter, prompt, socket=ctx.client.socket_path, stop=stop, on_text=show, **options
        )
    except DaemonError as e:
        if not as_json:
            click.echo("")
        _fail(e)
    except (FileNotFoundError, ValueError) as e:
        click.echo(f"error: {e}")
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"done": True, "text": out["text"], "tokens": out["tokens"], "adapter": out["method"]}))
    else:
        click.echo("")


@cli.command()
@click.option("-m", "--model", required=True, help="Model name in the local store, or a model dir.")
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help='JSON lines {"prompt": ..., "completion": ...}; the loss is on completion tokens.',
)
@click.option("--method", type=click.Choice(["ptune", "deep_ptune", "lora"]), default="ptune", show_default=True)
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where to save the result.")
@click.option("--lr", type=float, default=None, help="Learning rate [1e-2 for prompts, 1e-3 for LoRA].")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--prompt-len", type=int, default=16, show_default=True, help="Soft prompt tokens (ptune).")
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank (alpha = 2 x rank).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_obj
def finetune(
    ctx: Ctx,
    model: str,
    data: str,
    method: str,
    steps: int,
    out_dir: str,
    lr: float | None,
    batch_size: int,
    prompt_len: int,
    rank: int,
    seed: int,
) -> None:
    """Train soft prompts or LoRA on DATA through the swarm (servers' weights never change); save them to OUT."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .finetune import FinetuneConfig, finetune_from_file
    from .remote_model import RemoteModelForCausalLM

    config = FinetuneConfig(
        method=method,
        steps=steps,
        lr=lr or (1e-3 if method == "lora" else 1e-2),
        batch_size=batch_size,
        prompt_len=prompt_len,
        rank=rank,
        alpha=2.0 * rank,
        seed=seed,
    )
    try:
        config.validate()
        remote = RemoteModelForCausalLM.from_pretrained(model, ctx.client.socket_path)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, disable=ctx.as_json) as progress:
            task = progress.add_task(method, total=steps, loss="-")

            def on_step(step: int, loss: float) -> None:
                progress.update(task, advance=1, loss=f"{loss:.4f}")

            losses = finetune_from_file(remote, data, config, out_dir, on_step)
    except DaemonError as e:
        _fail(e)
    except (FileNotFoundError, ValueError) as e:
        click.echo(f"error: {e}")
        sys.exit(1)
    if ctx.as_json:
        return _print_json({"out": out_dir, "method": method, "losses": losses})
    click.echo(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {steps} steps; saved to {out_dir}")


def main() -> None:
    cli()
