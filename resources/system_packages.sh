#!/usr/bin/env bash
# Installs the Debian packages Open3D needs (import and offscreen rendering), when missing.
# As root it runs apt-get; otherwise it prints the command to run. Never fails the set-up:
# everything but the Open3D demo works without them.
set -u
packages=(libusb-1.0-0 libvulkan1 mesa-vulkan-drivers)
if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "system packages: not a Debian/Ubuntu system; Open3D needs libusb-1.0 and a Vulkan driver (${packages[*]} on Debian)."
  exit 0
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system packages: installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "system packages: apt-get failed; run: sudo apt-get install -y ${missing[*]}"
else
  echo "system packages: Open3D needs ${missing[*]}; run: sudo apt-get install -y ${missing[*]}"
fi
