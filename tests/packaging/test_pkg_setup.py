"""The README's two set-up commands on a stock Debian 12, as a user would type them.

Debian's python3 has no pip and no ensurepip (python3-venv is not installed) and
refuses `pip install` outside a venv: `./nox.sh` must still get nox and run the
demo and the tests. The cached debootstrap gets `python3` and `git` from Debian
(nothing else), a user `dev` and a copy of this commit; the commands run in a
chroot of a private mount namespace, with the host's network.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import lobbyd_pkgtest as pk
import pytest

pk.require_packaging_session()


@pytest.fixture(scope="module")
def debian(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stock") / "root"
    pk.sh(["bash", str(pk.TESTS / "packaging" / "make-rootfs.sh")], timeout=900)
    pk.sh(["cp", "-a", "--reflink=auto", str(pk.ROOTFS_CACHE), str(root)], timeout=300)
    # The host's CA bundle: the same public CAs on a real machine, and the one that
    # also trusts a TLS-inspecting proxy where there is one.
    for name in ("etc/resolv.conf", "etc/ssl/certs/ca-certificates.crt"):
        pk.sh(["cp", "-L", f"/{name}", str(root / name)])
    in_root(root, "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                  "apt-get install -y -qq --no-install-recommends python3 git >/dev/null "
                  "&& useradd -m dev", timeout=600)
    checkout = root / "home" / "dev" / "lobbyd"
    checkout.mkdir()
    archive = subprocess.run(["git", "-C", str(pk.ROOT), "archive", "HEAD"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive, check=True)
    in_root(root, "chown -R dev:dev /home/dev/lobbyd")
    return root


def in_root(root: Path, command: str, user: str | None = None, timeout: float = 900
            ) -> subprocess.CompletedProcess:
    """`command` in the chroot (with /proc and its own /dev/pts), as root or `user`."""
    if user:
        env = "env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/home/dev LANG=C.UTF-8"
        for name in ("PIP_CERT", "SSL_CERT_FILE"):  # a TLS-inspecting proxy's CA, if any
            if os.environ.get(name):
                env += f" {name}=/etc/ssl/certs/ca-certificates.crt"
        command = f"su {user} -s /bin/sh -c 'cd ~/lobbyd && {env} {command}'"
    script = (f'mount -t proc proc "{root}/proc" && '
              f'mount -t devpts -o newinstance,ptmxmode=0666 devpts "{root}/dev/pts" && '
              f'mount --bind "{root}/dev/pts/ptmx" "{root}/dev/ptmx" && '
              f'exec chroot "{root}" /bin/sh -c "$0"')
    return pk.sh(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                  command], check=False, timeout=timeout)


def test_stock_python_cannot_pip_install(debian: Path) -> None:
    """The premise: what the old README commands ran into."""
    done = in_root(debian, "python3 -m pip install nox", user="dev")
    assert done.returncode != 0 and "No module named pip" in done.stderr, done
    done = in_root(debian, "python3 -m venv /tmp/v", user="dev")
    assert done.returncode != 0 and "ensurepip is not" in done.stdout, done


def test_readme_test_command_passes(debian: Path) -> None:
    done = in_root(debian, "./nox.sh -s tests -- tests/test_config.py tests/test_lobbyctl.py "
                           "tests/test_labels.py -q", user="dev")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "suite-3.11: success" in out
    assert "suite-3.9: skipped (Python interpreter 3.9 not found)" in out


#: Ctrl-C as a terminal sends it, as soon as the demo lists both daemons (it prints
#: "lobbyd is running" once its `curl` shows both): `./nox.sh -s demo` in a process group
#: of its own, SIGINT to the whole group. The deadline covers the first run's installs.
CTRL_C_WHEN_UP = """\
import os, signal, subprocess, sys, time
demo = subprocess.Popen(["./nox.sh", "-s", "demo"], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, start_new_session=True)
deadline = time.monotonic() + 600
for line in demo.stdout:
    sys.stdout.buffer.write(line)
    if b"lobbyd is running on :1313" in line or time.monotonic() > deadline:
        break
try:
    os.killpg(demo.pid, signal.SIGINT)
except ProcessLookupError:
    pass
sys.stdout.buffer.write(demo.stdout.read())
sys.exit(demo.wait(timeout=60))
"""


def test_readme_demo_command_runs_lobbyd(debian: Path) -> None:
    (debian / "home" / "dev" / "ctrl_c_when_up.py").write_text(CTRL_C_WHEN_UP)
    done = in_root(debian, "python3 ../ctrl_c_when_up.py", user="dev", timeout=700)
    out = done.stdout + done.stderr
    assert '"hostname": "alpha.demo"' in out and '"hostname": "beta.demo"' in out, out[-4000:]
    assert "[alpha]" in out and "SIGINT: stopping" in out and "said goodbye as beta.demo" in out
