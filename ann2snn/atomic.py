"""Output folders that appear whole or not at all, and one-line reasons when they cannot be written."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import Ann2SnnError


def as_os_error(exc: BaseException) -> OSError | None:
    """`exc` as an OSError when it is one, or when it wraps one (safetensors reports "... (os error 28) ...")."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def write_failure(path: Path, exc: OSError) -> str:
    """One line: what could not be written, the operating system's reason, and what to do about that reason."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free disk space or choose another --out"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "choose an --out in a folder you can write to"
    else:
        advice = "choose another --out"
    return f"could not write {path}: {exc.strerror or exc}; {advice}"


def check_writable(out: Path, error: type[Ann2SnnError]) -> None:
    """Refuse, before any work, an `out` whose folder cannot be created or written: try it, and leave nothing."""
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"cannot create {out}: {existing} is a file, not a folder; choose another --out")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise error(write_failure(out, exc)) from None


def _file_mode() -> int:
    """0o666 less the process's umask: the mode `open()` gives a new file (what a user expects of an export)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def atomic_folder(out: Path, error: type[Ann2SnnError], overwrite: bool = False):
    """Yield a hidden sibling folder to fill; rename it to `out` only when the block succeeds.

    Any failure (an exception, Ctrl-C, a SIGTERM turned into KeyboardInterrupt)
    removes the partial folder; a failed write (e.g. a full disk) is raised as
    `error` with a one-line message naming the operating system's reason. Every
    file gets the same mode, as `open()` would give it (some writers make 0600
    temporary files). With `overwrite`, an existing `out` is replaced — the
    caller decides what may be (`ann2snn.export.check_output`) — and removed
    only once the new folder is in place.
    """
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        mode = _file_mode()
        for path in sorted(tmp.iterdir()):
            os.chmod(path, mode)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if overwrite and (out.exists() or out.is_symlink()):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)  # put the user's folder back
            raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = as_os_error(exc) if isinstance(exc, Exception) else None
        if cause is not None:
            raise error(write_failure(out, cause)) from None
        raise
    if old is not None:
        try:
            _remove(old)
        except OSError as exc:
            raise error(f"wrote {out}, but could not remove the folder it replaced, kept as {old}: "
                        f"{exc.strerror or exc}; delete it yourself") from None
