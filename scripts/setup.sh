#!/usr/bin/env bash
# Install everything Kemari Suite needs on a Debian 12 host, idempotently:
# Debian packages with apt-get, then a virtual environment (.venv) with the package and
# its Python dependencies (pinned with lower bounds in pyproject.toml).
# A second run does no work: packages are checked with dpkg-query, and the venv is
# rebuilt only when pyproject.toml or this script changes (hash in .venv/.kemari-setup).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PACKAGES=(
  qemu-system-x86 qemu-utils busybox-static cpio gzip zstd xz-utils kmod
  gcc libc6-dev make iproute2 iputils-ping drbd-utils openssh-server openssh-client
  fio python3 python3-venv python3-dev ca-certificates debootstrap e2fsprogs curl
  resource-agents pacemaker-cli-utils libxml2-utils
  pacemaker corosync corosync-qdevice corosync-qnetd
)

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (it installs Debian packages and creates network namespaces)" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY="${KEMARI_PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "setup: $PY is older than Python 3.11" >&2
  exit 1
fi

want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
have="$(cat .venv/.kemari-setup 2>/dev/null || true)"
if [ ! -x .venv/bin/python ] || [ "$want" != "$have" ]; then
  echo "setup: creating the virtual environment in .venv"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > .venv/.kemari-setup
fi

# The uffd-wp tracker's helper, loaded into QEMU (compiled once per source, cached).
.venv/bin/python -m kemari_suite.vm.wphelper >/dev/null
