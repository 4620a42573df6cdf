"""Output folders that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import Ann2SnnError


@contextmanager
def atomic_folder(out: Path, error: type[Ann2SnnError], overwrite: bool = False):
    """Yield a hidden sibling folder to fill; rename it to `out` only when the block succeeds.

    Any failure (an exception, Ctrl-C, a SIGTERM turned into KeyboardInterrupt)
    removes the partial folder; a failed write (e.g. a full disk) is raised as
    `error` with a one-line message.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        for path in sorted(tmp.iterdir()):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if out.exists() and overwrite:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error(f"could not write {out}: {exc.strerror or exc}; free disk space or choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
