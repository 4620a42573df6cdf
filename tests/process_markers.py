"""Waiting for a child process to announce, on stderr, that it reached the point a test wants to signal it at."""

import time


def wait_for_marker(proc, marker: str, timeout_s: float = 120) -> bool:
    """Read `proc`'s stderr until a line holds `marker`; False if the process ends or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    for line in proc.stderr:
        if marker in line:
            return True
        if time.monotonic() > deadline:
            return False
    return False
