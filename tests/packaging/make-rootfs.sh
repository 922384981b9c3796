#!/bin/bash
# Debootstraps a minimal Debian (bookworm) that systemd-nspawn can boot, once per
# machine: the result is cached in $LOBBYD_ROOTFS_CACHE (default
# /var/cache/lobbyd-test/<release>, so keyed on the Debian release) and reused while
# its stamp file is there. The boot tests copy it (cp --reflink=auto -a) and never
# change the cache. Callers at the same time (.ci/run builds it in the background while
# the tests that need it may already ask) wait for one build under a lock.
set -euo pipefail
RELEASE=${LOBBYD_DEBIAN_RELEASE:-bookworm}
CACHE=${LOBBYD_ROOTFS_CACHE:-/var/cache/lobbyd-test/$RELEASE}
MIRROR=${LOBBYD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
STAMP="$CACHE/.lobbyd-rootfs-v1"
mkdir -p "$(dirname "$CACHE")"
exec 9>"$CACHE.lock"
flock 9
if [ -e "$STAMP" ]; then
    echo "make-rootfs: reusing $CACHE"
    exit 0
fi
rm -rf "$CACHE.tmp"
# systemd-sysv: PID 1; adduser: the .deb's postinst; ca-certificates: its Depends;
# curl: the README's commands; procps: handy when a boot test fails.
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,adduser,ca-certificates,curl,procps \
    "$RELEASE" "$CACHE.tmp" "$MIRROR"
echo lobbytest > "$CACHE.tmp/etc/hostname"
rm -f "$CACHE.tmp/etc/machine-id"
: > "$CACHE.tmp/etc/machine-id"
# Keep the image small and quiet: no apt caches.
rm -rf "$CACHE.tmp"/var/cache/apt/archives/*.deb "$CACHE.tmp"/var/lib/apt/lists/*
rm -rf "$CACHE"
mv "$CACHE.tmp" "$CACHE"
touch "$STAMP"
echo "make-rootfs: created $CACHE"
