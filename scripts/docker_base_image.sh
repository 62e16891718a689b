#!/usr/bin/env bash
# Builds a Debian base image with Python, for building Drip's image where no registry can be
# reached (CI, air-gapped hosts): debootstrap a minimal bookworm, add the host's CA bundle (TLS
# may pass through an intercepting proxy that only the host's bundle trusts), import it.
#   scripts/docker_base_image.sh [NAME:TAG]       default drip-test-base:bookworm
# Then: python3 training_starter.py --runtime docker --base_image NAME:TAG --docker_network host
# Does nothing when the image exists already. Needs root (debootstrap) and a running engine.
set -euo pipefail

image=${1:-drip-test-base:bookworm}
suite=${DRIP_BASE_SUITE:-bookworm}

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "[drip] base image $image exists" >&2
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "scripts/docker_base_image.sh: debootstrap needs root; run it with sudo" >&2
    exit 1
fi
command -v debootstrap >/dev/null || {
    echo "scripts/docker_base_image.sh: debootstrap is missing; sudo apt-get install debootstrap" >&2
    exit 1
}

# The mirror the host's own apt uses: it is the one known to be reachable from here.
mirror=${DRIP_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(grep -h -m1 -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | awk '{print $2}' || true)
fi
if [ -z "$mirror" ]; then
    mirror=$(grep -h -m1 -E '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$(mktemp -d /tmp/drip-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
start=$(date +%s)
echo "[drip] debootstrap $suite from $mirror (about a minute)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 20 "$rootfs.log" >&2
    echo "scripts/docker_base_image.sh: debootstrap failed (full log: $rootfs.log)" >&2
    exit 1
}
rm -f "$rootfs.log"
for bundle in /etc/ssl/certs/ca-certificates.crt; do
    [ -f "$bundle" ] && cp "$bundle" "$rootfs$bundle"
done
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "[drip] base image $image built in $(( $(date +%s) - start )) s" >&2
