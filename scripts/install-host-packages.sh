#!/usr/bin/env bash
# Install the Debian packages Bastion needs on the host, only those that are missing.
# Idempotent and fast when nothing is missing (no `apt-get update` then).
#
#   crun, runc     OCI runtimes (crun is the default, runc a drop-in alternative)
#   debootstrap    builds the sandbox image (+ the keyring and gpgv it verifies with)
#   slirp4netns    user-mode networking for sandboxes that ask for it
#   nftables       the egress rules that keep networked sandboxes off the host
#   gcc, libc6-dev build the static in-sandbox agent
#   tmux           drives terminals in tests
#   skopeo         pulls images from registries (bastion images pull)
#   docker-registry, busybox-static   a real registry and a tiny image for the image tests
#   iproute2, procps
#   python3-venv   only when the Python used by `make` cannot create a venv with pip
set -euo pipefail

PYTHON="${PYTHON:-python3}"
packages=(crun runc debootstrap debian-archive-keyring gpgv slirp4netns nftables gcc libc6-dev tmux iproute2 procps
          skopeo docker-registry busybox-static)

missing=()
for pkg in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "setup: missing host packages: ${missing[*]}" >&2
    echo "setup: run as root, or: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "setup: installing host packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
