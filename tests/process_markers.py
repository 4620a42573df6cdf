"""Starting a child process a test will signal, and waiting for it to announce, on stderr, that it reached the
point the test wants to signal it at."""

import signal
import subprocess
import time


def _default_sigint():
    # A test runner started with SIGINT ignored (`pytest &` in a non-interactive shell) passes the ignore on, and a
    # Python child that inherits it never raises KeyboardInterrupt: it would sleep through the test's SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_child(args, env) -> subprocess.Popen:
    """`args` run with stderr piped as text and SIGINT at its default, whatever the test runner inherited."""
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint)


def wait_for_marker(proc, marker: str, timeout_s: float = 120) -> bool:
    """Read `proc`'s stderr until a line holds `marker`; False if the process ends or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    for line in proc.stderr:
        if marker in line:
            return True
        if time.monotonic() > deadline:
            return False
    return False
