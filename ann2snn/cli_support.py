"""What every `ann2snn` subcommand shares: one-line errors, clean interrupts, option checks.

Kept apart from cli.py so that subcommands in their own modules (report_cli.py, …) can import it
without importing cli.py, which registers them.
"""

from __future__ import annotations

import functools
import signal
import sys

import click

from .errors import Ann2SnnError


def interrupt(signum, frame):
    raise KeyboardInterrupt


def clean_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        # SIGTERM unwinds like Ctrl-C, so atomic writers clean up their partial folders.
        signal.signal(signal.SIGTERM, interrupt)
        try:
            return command(*args, **kwargs)
        except Ann2SnnError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
    return wrapper


def positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be a positive integer, got {value}")
    return value


def device_map_option(command):
    """--device-map: where the model runs (`ann2snn.placement`); checked by the command before it loads anything."""
    return click.option(
        "--device-map", default="cpu", show_default=True,
        help="cpu, a device (cuda, cuda:1, mps) or auto: accelerate spreads whole decoder layers over the GPUs "
             "there are and keeps the rest in CPU memory (needs accelerate)."
    )(command)
