"""Helpers of the packaging tests (tests/packaging; run by `nox -s packaging_tests`).

No conftest.py here on purpose: a second conftest module would shadow
tests/conftest.py for the core tests' `from conftest import ...`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the one harness
import harness

ROOT = harness.ROOT
DIST = ROOT / "dist"
TESTS = ROOT / "tests"
#: the cached debootstrap (tests/packaging/make-rootfs.sh), keyed on the Debian release
ROOTFS_CACHE = Path(os.environ.get(
    "LOBBYD_ROOTFS_CACHE",
    f"/var/cache/lobbyd-test/{os.environ.get('LOBBYD_DEBIAN_RELEASE', 'bookworm')}"))


def require_packaging_session() -> None:
    """Skip the calling module unless run by `nox -s packaging_tests`."""
    if not os.environ.get("LOBBYD_PACKAGING_TESTS"):
        pytest.skip("packaging tests run with `nox -s packaging_tests` "
                    "(after binary, tarball, deb)", allow_module_level=True)


def _load_build():
    spec = importlib.util.spec_from_file_location("lobbyd_build", ROOT / "packaging" / "build.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader
    spec.loader.exec_module(module)
    return module


build = _load_build()
VERSION = build.version()
ARCH = build.ARCH
BINARY = build.BINARY
TARBALL = build.tarball_path()
DEB_VERSION = build.deb_version()


def deb_path() -> Path:
    debs = sorted(DIST.glob(f"lobbyd_{DEB_VERSION}_*.deb"))
    assert debs, f"no lobbyd_{DEB_VERSION}_*.deb in dist/: run `nox -s deb` first"
    return debs[-1]


def need(path: Path, session: str) -> Path:
    assert path.exists(), f"{path} missing: run `nox -s {session}` first"
    return path


def sh(cmd: list[str] | str, check: bool = True, timeout: float = 120, **kw
       ) -> subprocess.CompletedProcess:
    """Run a command, capture text output, fail with its output."""
    if isinstance(cmd, str):
        cmd = ["sh", "-c", cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}"
                             f"\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def wait_for(predicate: Callable[[], object], timeout: float = 20, interval: float = 0.1,
             what: str = "condition") -> object:
    """The harness's wait_for with the packaging tests' slower defaults; a predicate that
    asserts (inside a container still booting, say) is tried again."""
    return harness.wait_for(predicate, timeout, interval, what,
                            retry_on=(*harness.RETRY_ON, AssertionError,
                                      subprocess.SubprocessError))


def readme_install_blocks() -> dict[str, str]:
    """The ```sh blocks of README's install section, by their ### heading."""
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- section: install (packaging) -->")
    end = text.index("\n## ", start)
    section = text[start:end]
    blocks: dict[str, str] = {}
    heading = ""
    for part in re.split(r"(^### [^\n]*$|^```sh\n.*?^```$)", section, flags=re.M | re.S):
        if part.startswith("### "):
            heading = part[4:].strip()
        elif part.startswith("```sh"):
            body = part[len("```sh\n"):-3]
            blocks[heading] = blocks.get(heading, "") + body
    return blocks


# --------------------------------------------------------------------------- TLS


def make_ca(directory: Path, name: str = "lobbyd test CA") -> tuple[Path, Path, Path]:
    """A fresh CA and a server certificate for localhost/127.0.0.1 signed by it.

    Returns (ca.pem, server.pem, server.key).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                   "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "basicConstraints=critical,CA:FALSE\n")
    sh(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    sh(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"])
    sh(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)])
    return ca, cert, key


# --------------------------------------------------------------------------- nspawn


CONTAINER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "LANG": "C.UTF-8", "TERM": "dumb"}


class Container:
    """A Debian bookworm booted with systemd-nspawn, driven with nsenter.

    The rootfs is a copy of the cached debootstrap (tests/packaging/make-rootfs.sh);
    the container has its own network namespace holding only loopback.
    """

    def __init__(self, workdir: Path, name: str, binds: dict[Path, str] | None = None):
        self.workdir = workdir
        self.name = name
        self.root = workdir / f"{name}-root"
        self.log = workdir / f"{name}-console.log"
        self.binds = binds or {}
        self.proc: subprocess.Popen | None = None
        self.pid1 = 0

    def boot(self, timeout: float = 90) -> Container:
        sh(["bash", str(TESTS / "packaging" / "make-rootfs.sh")], timeout=900)
        sh(["cp", "-a", "--reflink=auto", str(ROOTFS_CACHE), str(self.root)], timeout=300)
        cmd = ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
               "--private-network", f"--machine={self.name}", f"--hostname={self.name}",
               "--directory", str(self.root)]
        for host, inside in self.binds.items():
            cmd.append(f"--bind-ro={host}:{inside}")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pid1 = int(wait_for(self._find_pid1, timeout=30, what="the container's PID 1"))
        wait_for(self._booted, timeout=timeout, interval=0.5, what=f"{self.name} to boot")
        return self

    def _find_pid1(self) -> int:
        assert self.proc
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited: {self.log.read_text(errors='replace')}")
        # nspawn first forks a short-lived setup child; PID 1 is the child running systemd.
        for pid in sh(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], check=False
                      ).stdout.split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                continue
        return 0

    def _booted(self) -> bool:
        self.pid1 = self._find_pid1() or self.pid1
        state = self.run("systemctl is-system-running", check=False).stdout.strip()
        if state in ("running", "degraded"):
            return True
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"container died: {self.log.read_text(errors='replace')[-3000:]}")
        return False

    def run(self, script: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess:
        """Run a shell script inside the container (all its namespaces, its root)."""
        return sh(["nsenter", "--target", str(self.pid1), "--mount", "--uts", "--ipc", "--net",
                   "--pid", "--root", "--wd", "/bin/sh", "-c", "cd / && " + script],
                  check=check, timeout=timeout, env=CONTAINER_ENV)

    def popen_in_netns(self, cmd: list[str], **kw) -> subprocess.Popen:
        """A host program inside the container's network namespace only."""
        return subprocess.Popen(["nsenter", "--target", str(self.pid1), "--net", *cmd], **kw)

    def shutdown(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container to power off
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def python() -> str:
    return sys.executable
