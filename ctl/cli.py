"""`petalctl`: the command line for a local petald, over its Unix socket.

Exit codes: 0 success, 1 the daemon answered with an error, 2 no daemon reachable (or a usage error).
"""

from __future__ import annotations

import json
import sys
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
        click.echo(f"{key:>12}: {', '.join(map(str, value)) if isinstance(value, list) else value}")


@cli.command()
@click.option("-m", "--model", help="Only this model [all models the swarm serves].")
@click.pass_obj
def swarm(ctx: Ctx, model: str | None) -> None:
    """Servers of each model: spans, state, throughput, cache left."""
    out = _call(ctx, "GET", "/v1/swarm" + (f"?model={quote(model)}" if model else ""))
    if ctx.as_json:
        return _print_json(out)
    if not out["models"]:
        click.echo("the swarm serves no model yet; start a server with `petald --serve MODEL ...`")
    for m in out["models"]:
        table = Table(title=f"{m['model']} ({m['num_blocks']} blocks, {m['family']}, fp {m['fingerprint']})")
        for col in ("blocks", "state", "tokens/s", "cache left", "quant", "peer"):
            table.add_column(col)
        for s in m["servers"]:
            table.add_row(f"{s['start']}:{s['end']}", s["state"], f"{s['throughput']:.1f}", str(s["cache_tokens_left"]),
                          s["quant"] or "-", s["peer_id"])
        console.print(table)
        if m["uncovered"]:
            console.print(f"[red]no online server for blocks {', '.join(f'{a}:{b}' for a, b in m['uncovered'])}[/red]")


@cli.command()
@click.option("-m", "--model", required=True, help="Model name.")
@click.pass_obj
def route(ctx: Ctx, model: str) -> None:
    """The chain of servers an inference session would take now."""
    out = _call(ctx, "GET", f"/v1/route?model={quote(model)}")
    if ctx.as_json:
        return _print_json(out)
    table = Table(title=f"route for {model}")
    for col in ("blocks", "latency ms", "peer"):
        table.add_column(col)
    for h in out["chain"]:
        latency = "-" if h["latency_s"] is None else f"{h['latency_s'] * 1000:.1f}"
        table.add_row(f"{h['start']}:{h['end']}", latency, h["peer_id"])
    console.print(table)


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
@click.pass_obj
def generate(ctx: Ctx, model: str, prompt: str, as_json: bool, stop: tuple[str, ...], **options: Any) -> None:
    """Generate text from PROMPT through the swarm, streaming tokens as they come."""
    as_json = as_json or ctx.as_json
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
        table.add_row(m["id"], m.get("family", ""), str(m.get("num_blocks", "")), str(m.get("servers", "")),
                      m.get("fingerprint", ""))
    console.print(table)


@models.command("pull")
@click.argument("name")
@click.pass_obj
def models_pull(ctx: Ctx, name: str) -> None:
    """Download NAME into the daemon's models dir (needed to generate with it: the head runs locally)."""
    out = _call(ctx, "POST", "/v1/models/pull", {"name": name})
    if ctx.as_json:
        return _print_json(out)
    click.echo(f"{out['name']} is in {out['path']}")


def main() -> None:
    cli()
