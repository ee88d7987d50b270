"""`petalctl`: the command line for a local petald, over its Unix socket."""

from __future__ import annotations

import click


@click.group()
def cli() -> None:
    """Talk to the local petal daemon."""


def main() -> None:
    cli()
