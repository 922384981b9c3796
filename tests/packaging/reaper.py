"""Run a test command so that no lobbyd outlives a SIGKILL of its main process.

    python tests/packaging/reaper.py pytest tests ...

The static binary is a chain of processes (staticx loader -> PyInstaller loader
-> Python). The core suite's `kill()` (and every fixture teardown) sends
SIGKILL to the first one only; the other two would live on as orphans, keep
publishing, and fill TMPDIR. systemd kills the whole cgroup; here this script
does the equivalent: it becomes the child subreaper of the command, so orphans
are re-parented to it, and kills each orphan (and what it started) at once.
When the command ends, whatever is left of its session is killed too.
Exit status: the command's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def stat_fields(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[3])


def processes() -> dict[int, tuple[int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = stat_fields(int(name))
            if info:
                out[int(name)] = info
    return out


def kill_tree(root: int, table: dict[int, tuple[int, int]]) -> None:
    children = [pid for pid, (ppid, _) in table.items() if ppid == root]
    for pid in children:
        kill_tree(pid, table)
    with contextlib.suppress(ProcessLookupError):
        os.kill(root, signal.SIGKILL)


def reap(pid: int) -> None:
    """Collect an adopted process once it is dead (never the command: Popen does that)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} COMMAND [ARG...]")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"reaper: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    child = subprocess.Popen(sys.argv[1:], start_new_session=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    me = os.getpid()
    killed: set[int] = set()
    while child.poll() is None:
        table = processes()
        for pid, (ppid, _) in table.items():
            if ppid == me and pid != child.pid:  # an orphan re-parented to us
                kill_tree(pid, table)
                reap(pid)
                killed.add(pid)
        time.sleep(0.05)
    table = processes()
    for pid, (_, sid) in table.items():
        if sid == child.pid and pid != me:
            kill_tree(pid, table)
            killed.add(pid)
    time.sleep(0.2)
    for pid, (ppid, _) in processes().items():
        if ppid == me:
            reap(pid)
    if killed:
        print(f"reaper: killed {len(killed)} orphaned process tree(s) left by SIGKILLed daemons",
              flush=True)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
