"""The artifacts in dist/: static binary, tarball, .deb, SHA256SUMS, version from one place."""

from __future__ import annotations

import ast
import hashlib
import os
import re
import stat
import subprocess
import tarfile
from pathlib import Path

import lobbyd_pkgtest as pk
import pytest

pk.require_packaging_session()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_binary_is_static_executable_0755():
    binary = pk.need(pk.BINARY, "binary")
    assert binary.name == f"lobbyd_linux_{os.uname().machine}"
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    kind = pk.sh(["file", "-b", str(binary)]).stdout
    assert "statically linked" in kind, kind
    assert "stripped" in kind and "not stripped" not in kind, kind
    ldd = pk.sh(["ldd", str(binary)], check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr, ldd


def test_version_comes_from_lobbyd_py_only():
    tree = ast.parse((pk.ROOT / "lobbyd.py").read_text())
    (value,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "__version__" for t in n.targets)]
    assert value == pk.VERSION
    out = pk.sh([str(pk.BINARY), "--version"], env={"PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == f"lobbyd {pk.VERSION}"
    # No other file of ours spells the version out (debian/changelog is the
    # package's history; build.py follows lobbyd.py when it lags).
    pyproject = (pk.ROOT / "pyproject.toml").read_text()
    assert 'version = {attr = "lobbyd.__version__"}' in pyproject


def test_help_and_bad_config_exit_codes():
    env = {"PATH": "/usr/bin:/bin"}
    out = pk.sh([str(pk.BINARY), "--help"], env=env)
    assert "usage" in out.stdout.lower()
    bad = subprocess.run([str(pk.BINARY)], env={**env, "PORT": "abc"}, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 78, bad
    assert "PORT" in bad.stderr


def test_tarball_contents():
    tarball = pk.need(pk.TARBALL, "tarball")
    top = f"lobbyd-{pk.VERSION}-linux-{pk.ARCH}"
    with tarfile.open(tarball) as tar:
        names = sorted(tar.getnames())
        assert names == sorted([top] + [f"{top}/{n}" for n in (
            "lobbyd", "lobbyctl", "lobbyd.service", "lobbyd.env", "README.md", "LICENSE")])
        members = {m.name: m for m in tar.getmembers()}
        assert members[f"{top}/lobbyd"].mode == 0o755
        assert members[f"{top}/lobbyd.env"].mode == 0o640  # the file of secrets
        client = members[f"{top}/lobbyctl"]  # the client: the same binary by another name
        assert client.issym() and client.linkname == "lobbyd"
        assert all(m.uid == 0 and m.gid == 0 for m in members.values())

        def content(name: str) -> bytes:
            f = tar.extractfile(f"{top}/{name}")
            assert f
            return f.read()

        assert content("lobbyd") == pk.BINARY.read_bytes()
        assert content("lobbyd.service") == (pk.ROOT / "packaging/lobbyd.service").read_bytes()
        assert content("lobbyd.env") == (pk.ROOT / "packaging/lobbyd.env").read_bytes()
        assert content("README.md") == (pk.ROOT / "README.md").read_bytes()


def test_sha256sums_cover_every_artifact():
    sums = pk.need(pk.DIST / "SHA256SUMS", "binary")
    listed = {}
    for line in sums.read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    expected = {pk.BINARY.name, pk.TARBALL.name, pk.deb_path().name}
    assert set(listed) == expected
    for name, digest in listed.items():
        assert sha256(pk.DIST / name) == digest, name
    pk.sh(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=pk.DIST)


@pytest.fixture(scope="module")
def deb_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    pk.sh(["dpkg-deb", "-R", str(pk.deb_path()), str(out)])
    return out


def test_deb_installs_lobbyd_unpacked(deb_tree: Path):
    """/usr/lib/lobbyd: PyInstaller's one-directory build (nothing to unpack at start),
    with Debian's libraries instead of copies (dh_shlibdeps depends on them);
    /usr/bin/lobbyd a symlink to it, which runs as it is."""
    exe = deb_tree / "usr/lib/lobbyd/lobbyd"
    assert stat.S_IMODE(exe.stat().st_mode) == 0o755
    kind = pk.sh(["file", "-b", str(exe)]).stdout
    assert "dynamically linked" in kind and "not stripped" not in kind, kind
    internal = deb_tree / "usr/lib/lobbyd/_internal"
    libs = sorted(p.name for p in internal.glob("lib*.so*"))
    assert any(name.startswith("libpython3") for name in libs), libs
    assert not [n for n in libs if n.startswith(("libssl", "libcrypto", "libz.", "libffi"))]
    link = deb_tree / "usr/bin/lobbyd"
    assert link.is_symlink() and os.readlink(link) == "../lib/lobbyd/lobbyd"
    out = pk.sh([str(link), "--version"], env={"PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == f"lobbyd {pk.VERSION}"
    bad = subprocess.run([str(link)], env={"PATH": "/usr/bin:/bin", "PORT": "abc"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 78 and "PORT" in bad.stderr, bad


def test_deb_has_lobbyctl(deb_tree: Path):
    """/usr/bin/lobbyctl: the same program by another name, and its man page."""
    client = deb_tree / "usr/bin/lobbyctl"
    assert client.is_symlink() and os.readlink(client) == "lobbyd"
    usage = subprocess.run([str(client), "--help"], env={"PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=30)
    assert "lobbyctl" in usage.stdout + usage.stderr, usage
    page = deb_tree / "usr/share/man/man1/lobbyctl.1.gz"
    assert page.is_symlink() and os.readlink(page) == "lobbyd.1.gz"
    assert page.resolve() == (deb_tree / "usr/share/man/man1/lobbyd.1.gz").resolve()


def test_deb_metadata(deb_tree: Path):
    control = (deb_tree / "DEBIAN/control").read_text()
    fields = dict(line.split(": ", 1) for line in control.splitlines() if ": " in line
                  and not line.startswith(" "))
    assert fields["Package"] == "lobbyd"
    assert fields["Version"] == pk.DEB_VERSION
    depends = [d.strip().split()[0] for d in fields["Depends"].split(",")]
    assert "ca-certificates" in depends
    assert {"libc6", "libssl3", "zlib1g"} <= set(depends), depends  # dh_shlibdeps
    assert "lobbyd" not in depends  # its private libraries offer nothing (no shlibs file)
    assert (deb_tree / "DEBIAN/conffiles").read_text().split() == ["/etc/default/lobbyd"]
    # the file of secrets is never world-readable, not even before postinst runs
    listing = pk.sh(["dpkg-deb", "-c", str(pk.deb_path())]).stdout
    entry = next(line for line in listing.splitlines() if line.endswith(" ./etc/default/lobbyd"))
    assert entry.split()[:2] == ["-rw-r-----", "root/root"], entry
    assert (deb_tree / "etc/default/lobbyd").read_bytes() == \
        (pk.ROOT / "packaging/lobbyd.env").read_bytes()
    unit = deb_tree / "lib/systemd/system/lobbyd.service"
    assert unit.read_bytes() == (pk.ROOT / "packaging/lobbyd.service").read_bytes()
    assert (deb_tree / "usr/share/man/man1/lobbyd.1.gz").exists()
    postinst = (deb_tree / "DEBIAN/postinst").read_text()
    assert "deb-systemd-helper" in postinst and "enable" in postinst  # dh_installsystemd
    assert "adduser --system" in postinst
    postrm = (deb_tree / "DEBIAN/postrm").read_text()
    assert "deluser --system" in postrm


def test_man_page_renders_without_warnings():
    page = pk.ROOT / "packaging/lobbyd.1"
    proc = pk.sh(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
                 env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "MANWIDTH": "80"})
    assert proc.stderr.strip() == ""


def test_man_page_names_every_variable_of_help():
    helptext = pk.sh([str(pk.BINARY), "--help"], env={"PATH": "/usr/bin:/bin"}).stdout
    variables = re.findall(r"^  ([A-Z][A-Z0-9_]+) {2,}", helptext, flags=re.M)
    assert len(variables) > 10, helptext
    page = (pk.ROOT / "packaging/lobbyd.1").read_text().replace("\\-", "-")
    missing = [v for v in variables if not re.search(rf"\b{v}\b", page)]
    assert not missing, f"lobbyd.1 lacks {missing}"


def test_lintian_passes():
    changes = sorted((pk.ROOT / "build" / "deb").glob(f"lobbyd_{pk.DEB_VERSION}_*.changes"))
    target = changes[-1] if changes else pk.deb_path()
    proc = pk.sh(["lintian", "--fail-on", "error,warning", str(target)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # lintian sees the mode of the file of secrets: its override is used, so 0640
    shown = pk.sh(["lintian", "--show-overrides", str(target)], check=False).stdout
    assert "O: lobbyd: non-standard-file-perm 0640 != 0644 [etc/default/lobbyd]" in shown, shown
    overrides = (pk.ROOT / "debian/lobbyd.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(overrides):
        if line and not line.startswith("#"):
            assert i > 0 and overrides[i - 1].startswith("#"), f"override without a why: {line}"


@pytest.mark.parametrize("build", ["static binary", ".deb's unpacked tree"])
def test_both_builds_answer_dns(build: str, deb_tree: Path, tmp_path: Path):
    """dnslib is in both builds: with DNS_PORT set lobbyd answers dig (its own node's TXT
    labels, with no NATS reachable) instead of asking for `pip install lobbyd[dns]`."""
    exe = pk.need(pk.BINARY, "binary") if build == "static binary" else \
        deb_tree / "usr/lib/lobbyd/lobbyd"
    dns_port = pk.harness.free_port()
    env = {"PATH": "/usr/bin:/bin", "HOSTNAME": "pkg.test", "LABELS": "role:packaged",
           "PORT": str(pk.harness.free_port()), "DNS_PORT": str(dns_port),
           "LABELS_PATH": str(tmp_path), "NATS_URL": "nats://127.0.0.1:1",
           "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([str(exe)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    def answered() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        return '"role:packaged"' in pk.sh(["dig", "@127.0.0.1", "-p", str(dns_port), "+short",
                                           "+time=1", "+tries=1", "pkg.test.node.lobby",
                                           "TXT"], check=False).stdout
    try:
        assert pk.wait_for(answered, timeout=30), build
    finally:
        pk.harness.stop_process(proc)
