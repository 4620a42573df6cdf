"""What every `ann2snn` subcommand shares: one-line errors, warnings and interrupts, option checks.

Kept apart from cli.py so that subcommands in their own modules (report_cli.py, …) can import it
without importing cli.py, which registers them. It imports nothing heavy (no torch).
"""

from __future__ import annotations

import functools
import signal
import sys
import warnings

import click

from .errors import Ann2SnnError, Interrupted

# ann2snn.finetune.core.RULES, written out: importing it would import torch, and --help must not (tested equal)
FINETUNE_RULES = ("distill", "stdp")


def interrupt(signum, frame):
    raise KeyboardInterrupt


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings (e.g. too little calibration text) as one line on stderr, like the errors."""
    click.echo(f"warning: {message}", err=True)


def clean_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        # SIGTERM unwinds like Ctrl-C, so atomic writers clean up their partial folders.
        signal.signal(signal.SIGTERM, interrupt)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = one_line_warning
                return command(*args, **kwargs)
        except Ann2SnnError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except Interrupted as exc:
            kept = ", ".join(str(path) for path in exc.kept)
            click.echo(f"interrupted: no export was written; {kept} kept to resume from: rerun the same command to "
                       "continue (or delete them)", err=True)
            sys.exit(130)
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


def print_notes(figures: dict | None) -> None:
    """A fine-tune's warnings (a small holdout) and why it was skipped, one `note:` line each on stderr."""
    if figures:
        for message in figures.get("warnings", []) + ([figures["skipped"]] if figures.get("skipped") else []):
            click.echo(f"note: {message}", err=True)
