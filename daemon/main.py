"""`petald`: the long-lived daemon every machine runs (in the foreground; systemd or a terminal supervises it)."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import NoReturn

import click

from petal.daemon.config import ConfigError, load_config
from petal.daemon.pull import pull_command
from petal.daemon.startup import StartupError
from petal.daemon.systemd import EXIT_CODE_HELP, ExitCode, sd_notify, setup_logging

log = logging.getLogger("petal")

EPILOG = (
    "\b\nExit status (a failed start prints one line, 'petald: error: WHAT; WHAT TO DO', on stderr):\n"
    + "\n".join(f"  {int(code)}  {text}" for code, text in EXIT_CODE_HELP.items())
)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with the settings below.")
@click.option("--state-dir", help="Identity key and caches [XDG state dir, or /var/lib/petal for a system daemon].")
@click.option("--socket", help="Control socket path [$XDG_RUNTIME_DIR/petal/petald.sock or /run/petal/petald.sock].")
@click.option("--listen", multiple=True, help="libp2p listen multiaddr, repeatable [/ip4/0.0.0.0/tcp/31330].")
@click.option("--dht-port", type=int, help="UDP port of the DHT [the same number as the libp2p TCP port].")
@click.option("--initial-peer", "initial_peers", multiple=True, help="Address of a swarm member to join, repeatable.")
@click.option("--new-swarm", is_flag=True, default=None, help="Start a new swarm instead of joining one.")
@click.option(
    "--relay/--no-relay",
    default=None,
    help="Relay for peers behind NAT when reachable; when not, be reached through a relay [on].",
)
@click.option(
    "--direct",
    help="Block traffic over TLS/TCP on HOST:PORT (port 0: any) with peers that offer it; off: libp2p only "
    "[auto: the --listen host, its port + 1].",
)
@click.option("--http", help="Also serve the control API on this TCP address, e.g. 127.0.0.1:8080.")
@click.option(
    "--serve",
    multiple=True,
    help="Host blocks of this model (a models-dir name, a model dir path, or a .gguf file); MODEL:A:B hosts blocks "
    "A:B of it. Repeatable: several models, or disjoint spans of one.",
)
@click.option(
    "--blocks", help="Host blocks A:B (0-based, end exclusive) of each --serve without its own [all, or --num-blocks]."
)
@click.option("--num-blocks", type=int, help="Host this many blocks where the swarm's throughput is worst.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="Serve this PEFT LoRA adapter dir with the blocks (DIR, named after it, or NAME=DIR); requests name it. "
    "Repeatable.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Where served blocks run [cpu].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Served blocks' dtype [float32].")
@click.option("--quant", type=click.Choice(["none", "int8"]), help="Weight quantization of served blocks [none].")
@click.option("--max-cache-tokens", type=int, help="KV-cache budget in tokens x blocks [4096 x hosted blocks].")
@click.option(
    "--activation-budget-mb",
    type=int,
    help="MiB of training activations kept from a forward for its backward; 0: none [max(KV budget / 4, 1024)].",
)
@click.option("--max-batch", type=int, help="Largest batch a request may carry [8].")
@click.option("--max-length", type=int, help="Longest inference session / forward sequence in tokens [4096].")
@click.option(
    "--max-batch-tokens",
    type=int,
    help="Continuous batching: token rows of concurrent requests one server batch may hold; 0 or 1: off [1024].",
)
@click.option(
    "--inline-steps/--no-inline-steps",
    default=None,
    help="With one open inference session, run its decode steps on the event loop, not the compute thread [on].",
)
@click.option("--rebalance-period", type=float, help="With --num-blocks: seconds between checks whether to move [60].")
@click.option(
    "--codec",
    type=click.Choice(["auto", "none", "float16", "bfloat16", "q8"]),
    help="Wire codec of requests through the swarm [auto: none, or q8 on links below --slow-link-mbit].",
)
@click.option("--slow-link-mbit", type=float, help="With --codec auto: links measured below this use q8 [100].")
@click.option(
    "--spot-check-rate",
    type=float,
    help="Fraction of hops re-run on a second server and compared, to catch wrong activations; 0: off [0.01].",
)
@click.option(
    "--pipeline-min-tokens",
    type=int,
    help="Forwards of several rows and long prefills run as a pipeline of micro-batches of at least this many tokens; "
    "0: off [128].",
)
@click.option("--test-lie", type=float, hidden=True, help="TEST ONLY (needs PETAL_TEST_ONLY=1): add noise to output.")
@click.option("--alloc-timeout", type=float, help="Seconds a session waits for KV budget before 'busy' [10].")
@click.option("--public-name", help="A short name shown beside this daemon's servers (dashboards, petalctl swarm).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.pass_context
def cli(ctx: click.Context, /, config_file: str | None, **overrides: object) -> None:
    """Run the petal daemon: join (or start) a swarm and serve the local control socket."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        config = load_config(config_file, overrides)
    except ConfigError as e:
        fail(str(e), ExitCode.USAGE)
    from petal.daemon.node import run_node

    setup_logging(config.log_level)
    try:
        asyncio.run(run_node(config))
    except StartupError as e:
        fail(str(e), e.code, e)
    except ConfigError as e:  # a setting that only shows as unusable once used
        fail(str(e), ExitCode.USAGE, e)
    except KeyboardInterrupt:
        pass
    except Exception as e:  # noqa: BLE001 - a bug: one line that says so, the traceback at --log-level debug
        fail(
            f"unexpected {type(e).__name__}: {e}; this is a bug: rerun with --log-level debug for the traceback "
            "and report it",
            ExitCode.INTERNAL,
            e,
        )


cli.add_command(pull_command)


def fail(message: str, code: int, error: BaseException | None = None) -> NoReturn:
    """Exit with `code` after ONE line on stderr (and in systemd's STATUS=); the traceback only at debug level."""
    if error is not None:
        log.debug("petald failed", exc_info=error)
    line = " ".join(message.split())
    sd_notify(f"STATUS=failed: {line}")
    print(f"petald: error: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


def main() -> None:
    """`petald`: click's own errors (an unknown flag, a value of the wrong type) are one line too, exit status 2."""
    try:
        code = cli.main(standalone_mode=False)
    except click.UsageError as e:
        fail(f"{e.format_message()} (see petald --help)", ExitCode.USAGE)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except click.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else ExitCode.OK)
