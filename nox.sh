#!/bin/sh
# nox, from a virtual environment of its own (.nox/bootstrap) made on first use.
#
#   ./nox.sh -s demo      ./nox.sh -s tests      ./nox.sh -l
#
# Needs nothing but python3 >= 3.9. It works where `pip install nox` does not: Debian 12
# and Ubuntu 24.04 refuse pip outside a venv (externally-managed-environment) and ship
# python3 without ensurepip (no python3-venv), so the venv is made without pip and pip's
# own wheel, fetched from PyPI and checked against PyPI's sha256, installs pip and nox.
# With pyenv (or any python3 that has ensurepip) it is a plain `python3 -m venv`.
set -eu
cd "$(dirname "$0")"
venv=.nox/bootstrap
if ! "$venv/bin/python" -m nox --version >/dev/null 2>&1; then
    rm -rf "$venv"
    mkdir -p .nox
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        python3 -m venv --without-pip "$venv"
        "$venv/bin/python" - "$venv" <<'EOF'
import hashlib, json, subprocess, sys, urllib.parse, urllib.request
venv = sys.argv[1]
index = "https://pypi.org/pypi/pip/json"
with urllib.request.urlopen(index, timeout=60) as resp:
    release = json.load(resp)
wheel = next(f for f in release["urls"] if f["packagetype"] == "bdist_wheel")
with urllib.request.urlopen(urllib.parse.urljoin(index, wheel["url"]), timeout=120) as resp:
    data = resp.read()
if hashlib.sha256(data).hexdigest() != wheel["digests"]["sha256"]:
    sys.exit("nox.sh: the pip wheel from PyPI does not match its sha256")
path = f"{venv}/{wheel['filename']}"
with open(path, "wb") as out:
    out.write(data)
# a pip wheel runs pip: it installs itself into the venv
subprocess.run([f"{venv}/bin/python", f"{path}/pip", "install", "--quiet", path], check=True)
EOF
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check nox
fi
exec "$venv/bin/python" -m nox "$@"
