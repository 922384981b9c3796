"""Which tests of the core suite run the daemon, for `nox -s binary_tests`.

The static binary changes nothing for a test that never starts lobbyd: only the tests
that do (through harness.lobbyd_command(), the one place LOBBYD_CMD is read) run again
against the binary. Whether a test does is read from its code before it runs: the test
function, its fixtures, and the helpers of the test modules they call, followed through
their names (DAEMON_NAMES, the fixture `lobbyd`). In every run from source the guess is
checked against what the test did: a test that built lobbyd's command line while
classified "in-process" fails there, saying binary_tests would skip it.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import types
import zlib
from pathlib import Path
from typing import Callable

import harness
import pytest

#: set by `nox -s binary_tests`: deselect the tests that never start the daemon
BINARY_ONLY = "LOBBYD_BINARY_ONLY"
#: the names through which a test starts lobbyd (all end in harness.lobbyd_command)
DAEMON_NAMES = frozenset({"lobbyd_command", "run_lobbyd", "Lobbyd", "spawn"})
DAEMON_FIXTURES = frozenset({"lobbyd"})
TESTS = Path(__file__).resolve().parent

#: how many times harness.lobbyd_command() was called in this process
calls = 0


def count_commands() -> Callable[[], list[str]]:
    """Wrap harness.lobbyd_command with a counter; returns the wrapper (conftest re-exports
    it, so `from conftest import lobbyd_command` counts too)."""
    original = harness.lobbyd_command
    if getattr(original, "counted", False):
        return original

    @functools.wraps(original)
    def counted() -> list[str]:
        global calls
        calls += 1
        return original()

    counted.counted = True  # type: ignore[attr-defined]
    harness.lobbyd_command = counted
    return counted


def _ours(obj: object) -> bool:
    """A function or class defined in a module under tests/ (a test module or helper)."""
    module = getattr(obj, "__module__", None) or ""
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    return bool(path) and TESTS in Path(path).resolve().parents and \
        Path(path).name != "harness.py"


def _codes(obj: object) -> list[tuple[types.CodeType, dict]]:
    """The code objects of a function, or of every method of a class, with their globals."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if inspect.isfunction(obj):
        return [(obj.__code__, obj.__globals__)]
    if inspect.isclass(obj):
        out = []
        for value in vars(obj).values():
            out += _codes(value)
        return out
    return []


def starts_daemon(funcs: list[object]) -> bool:
    """Whether any of `funcs` (or what they call among the tests' own helpers) names a
    way to start lobbyd."""
    seen: set[int] = set()
    todo = [pair for f in funcs for pair in _codes(f)]
    while todo:
        code, globs = todo.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        names = set(code.co_names) | set(code.co_freevars)
        if names & DAEMON_NAMES:
            return True
        for name in code.co_names:
            target = globs.get(name)
            if target is not None and _ours(target):
                todo += _codes(target)
        todo += [(c, globs) for c in code.co_consts if isinstance(c, types.CodeType)]
    return False


def exercises_daemon(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    if names & DAEMON_FIXTURES:
        return True
    funcs: list[object] = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for name in names:
        for fixturedef in (info.name2fixturedefs.get(name, ()) if info else ()):
            funcs.append(fixturedef.func)
    return starts_daemon([f for f in funcs if f is not None])


#: LOBBYD_SHARD=K/N: the K-th of N shares of the tests, so that N runs at once (`nox -s
#: tests`, CI's binary_tests) cover every test exactly once
SHARD = "LOBBYD_SHARD"
#: seconds each test took in a run of the suite alone (`nox -s durations` writes it): the
#: shares are cut to take about the same time, not to hold the same number of tests
DURATIONS = TESTS / "durations.json"
#: where a run writes the durations of its tests (`nox -s durations`)
DURATIONS_OUT = "LOBBYD_DURATIONS_OUT"


def parse_shard(shard: str) -> tuple[int, int]:
    k, n = (int(x) for x in shard.split("/"))
    assert 0 <= k < n, f"{SHARD}={shard}: want K/N with 0 <= K < N"
    return k, n


def cut_shares(nodeids: list[str], n: int, durations: dict[str, float]) -> dict[str, int]:
    """The share (0 to n-1) of each test: the longest first, each to the share with the
    least time so far; a test `durations` does not know counts as the median one, and
    ties go by a hash of the id. The same tests always give the same shares, so the N
    runs of one suite agree without talking to each other."""
    known = sorted(durations.values())
    default = known[len(known) // 2] if known else 1.0
    order = sorted(nodeids, key=lambda t: (-durations.get(t, default),
                                           zlib.crc32(t.encode()), t))
    loads = [0.0] * n
    shares = {}
    for nodeid in order:
        k = min(range(n), key=lambda i: (loads[i], i))
        shares[nodeid] = k
        loads[k] += durations.get(nodeid, default)
    return shares


def read_durations() -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}  # no file: every test the same, shares of equal counts


class DurationRecorder:
    """A plugin (LOBBYD_DURATIONS_OUT=path): each test's set-up, call and tear-down
    seconds, written as DURATIONS is read once the run ends."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self) -> None:
        rounded = {k: round(v, 2) for k, v in sorted(self.seconds.items())}
        self.path.write_text(json.dumps(rounded, indent=0) + "\n")


def record_durations(config: pytest.Config) -> None:
    out = os.environ.get(DURATIONS_OUT)
    if out:
        config.pluginmanager.register(DurationRecorder(Path(out)), "lobbyd-durations")


def deselect_in_process(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under LOBBYD_BINARY_ONLY=1: only the tests that start the daemon; under
    LOBBYD_SHARD=K/N: only the K-th share."""
    binary_only, shard = os.environ.get(BINARY_ONLY) == "1", os.environ.get(SHARD, "")
    if not binary_only and not shard:
        return
    keep, drop = [], []
    for item in items:
        (keep if not binary_only or exercises_daemon(item) else drop).append(item)
    if shard:
        k, n = parse_shard(shard)
        shares = cut_shares([item.nodeid for item in keep], n, read_durations())
        drop += [item for item in keep if shares[item.nodeid] != k]
        keep = [item for item in keep if shares[item.nodeid] == k]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _classified_honestly(request: pytest.FixtureRequest):
    """From source: a test classified in-process must not have started lobbyd."""
    if os.environ.get(BINARY_ONLY) == "1" or os.environ.get("LOBBYD_CMD") or \
            Path(str(request.node.path)).parent != TESTS:  # the core suite's modules only
        yield
        return
    before = calls
    yield
    if calls != before and not exercises_daemon(request.node):
        pytest.fail(f"{request.node.nodeid} started lobbyd ({calls - before} command lines) "
                    f"but tests/selection.py sees no way it does: `nox -s binary_tests` would "
                    f"skip it (name the way in DAEMON_NAMES)", pytrace=False)
