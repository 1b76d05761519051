#!/usr/bin/env bash
# Installs what NovaCron needs on Debian 12, when it is missing, and builds the demo guest image.
#   - qemu-system-x86 and qemu-utils, pinned to the same version: installing qemu-system-x86 alone
#     can remove a newer qemu-utils from backports (and with it qemu-img);
#   - busybox-static and cpio for the demo image's initramfs;
#   - curl, and python3-venv for the API fuzzer (scripts/fuzz-api.sh);
#   - a Rust toolchain (rustup) if cargo is missing.
# Idempotent and quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

apt_updated=""
apt_update() {
  if [[ -z "$apt_updated" ]]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
}

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu)
command -v qemu-img >/dev/null || need_apt+=(qemu)
command -v cpio >/dev/null || need_apt+=(cpio)
# The demo initramfs needs a static busybox (ldd fails on a static binary).
busybox_ok=""
if command -v busybox >/dev/null; then
  banner=$(busybox 2>&1 || true)
  if [[ $banner == *BusyBox* ]] && ! ldd "$(command -v busybox)" >/dev/null 2>&1; then
    busybox_ok=1
  fi
fi
[[ -n "$busybox_ok" ]] || need_apt+=(busybox-static)
# curl for the scripts; Python's venv (with pip) for the API fuzzer of scripts/fuzz-api.sh.
command -v curl >/dev/null || need_apt+=(curl)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [[ ${#need_apt[@]} -gt 0 ]]; then
  apt_update
  pkgs=()
  for p in "${need_apt[@]}"; do
    if [[ $p == qemu ]]; then
      v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
      pkgs+=("qemu-system-x86=$v" "qemu-utils=$v")
    else
      pkgs+=("$p")
    fi
  done
  echo "setup: installing ${pkgs[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends --allow-downgrades "${pkgs[@]}" >/dev/null
fi
for bin in qemu-system-x86_64 qemu-img cpio busybox curl python3; do
  command -v "$bin" >/dev/null || { echo "setup: $bin is still missing" >&2; exit 1; }
done

if ! command -v cargo >/dev/null; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: installing Rust with rustup"
    apt_update
    $SUDO apt-get install -y -qq --no-install-recommends curl ca-certificates gcc libc6-dev >/dev/null
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

# The kernel package is looked up in the apt lists, which need to exist.
if ! grep -qs '"version": 5' .novacron/demo-image/image.json; then
  if ! apt-cache depends linux-image-cloud-amd64 2>/dev/null | grep -q 'Depends: linux-image-'; then
    apt_update
  fi
  scripts/build-demo-image.sh .novacron/demo-image
fi
