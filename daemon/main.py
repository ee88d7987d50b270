"""`petald`: the long-lived daemon every machine runs."""

from __future__ import annotations

import click


@click.group(invoke_without_command=True)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run the petal daemon (in the foreground)."""
    if ctx.invoked_subcommand is None:
        click.echo("petald: the swarm node is not implemented yet; `petald pull smollm2` fetches the default model")


def main() -> None:
    cli()
