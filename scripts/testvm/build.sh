#!/usr/bin/env bash
# Build the test VM once per change of its inputs: a Debian kernel and initrd
# (linux-image-amd64, installed in a debootstrap chroot, taken from its
# /boot) and an ext4 root image with lvm2, thin-provisioning-tools,
# cryptsetup, qemu-utils and python3 (plus the few Debian Python packages
# the project's .venv takes from the system; the tests run that .venv,
# shared from the host).  The VM exists because this machine's
# kernel has no device-mapper (tests/testvm.py boots it).
#
# The result lives in $VMDISK_TESTVM_CACHE/<hash of the inputs>/ (default
# ~/.cache/vmdisk-testvm, outside every work tree, so all clones on a machine
# share one build); prints that directory.  Idempotent; safe to run often.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

. /etc/os-release
SUITE="${VMDISK_TESTVM_SUITE:-$VERSION_CODENAME}"  # same Debian as the host: same python3
PACKAGES=(
  linux-image-amd64 kmod
  lvm2 dmsetup thin-provisioning-tools cryptsetup-bin
  qemu-utils e2fsprogs xfsprogs util-linux procps
  python3
)
# What the project's .venv takes from Debian's python3 (dist-packages), put
# in by apt inside the chroot: debootstrap fails configuring them itself.
PY_PACKAGES=(python3-certifi python3-charset-normalizer python3-cryptography python3-idna python3-libvirt)
IMAGE_BYTES=$((4 * 1024 * 1024 * 1024))  # sparse; room for the tests' PVs and the bench

inputs="$(cat "$here/build.sh" "$here/init"; echo "$SUITE ${PACKAGES[*]} ${PY_PACKAGES[*]}")"
key="$(printf '%s' "$inputs" | sha256sum | cut -c1-16)"
cache="${VMDISK_TESTVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmdisk-testvm}"
out="$cache/$key"
if [ -f "$out/ready" ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # another clone may be building the same thing
if [ -f "$out/ready" ]; then
  echo "$out"
  exit 0
fi

# The Debian mirror this host's apt already uses.
mirror="${VMDISK_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' \
  'Created-By: Packages' | awk -v s="$SUITE" '$2 == s {print $1; exit}')}"
[ -n "$mirror" ] || { echo "testvm: no apt source for $SUITE on this host" >&2; exit 1; }
command -v debootstrap >/dev/null || {
  echo "testvm: debootstrap is missing (scripts/setup.sh installs it)" >&2; exit 1; }

work="$cache/.build-$key"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
echo "testvm: building the VM image in $out (debootstrap $SUITE, a few minutes)" >&2
include="$(IFS=,; echo "${PACKAGES[*]}")"
debootstrap --variant=minbase --include="$include" "$SUITE" "$work/root" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }

root="$work/root"
mount -t proc proc "$root/proc"
if ! chroot "$root" sh -c "apt-get -qq update && DEBIAN_FRONTEND=noninteractive \
    apt-get -qq install -y --no-install-recommends ${PY_PACKAGES[*]}" >"$work/apt.log" 2>&1; then
  umount "$root/proc"; tail -30 "$work/apt.log" >&2; exit 1
fi
umount "$root/proc"
kver="$(basename "$(ls -d "$root"/lib/modules/* | sort -V | tail -1)")"
mkdir -p "$work/out"
cp "$root/boot/vmlinuz-$kver" "$work/out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/out/initrd.img"
chmod 0644 "$work/out/vmlinuz" "$work/out/initrd.img"

# What a VM that only runs tests does not need.
rm -rf "$root"/boot/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
  "$root"/usr/share/locale/* "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/*
mods="$root/lib/modules/$kver/kernel"
rm -rf "$mods"/drivers/{gpu,media,net/wireless,infiniband,staging,bluetooth,iio,input/touchscreen} \
  "$mods"/sound "$mods"/net/{wireless,mac80211,bluetooth}
chroot "$root" depmod -a "$kver"
install -m 0755 "$here/init" "$root/sbin/vmdisk-testvm-init"
echo "testvm" >"$root/etc/hostname"
# No udevd in the VM (nor in a pod): lvm2 must not wait for udev.
sed -i -e 's/^\(\s*\)# udev_sync = 1/\1udev_sync = 0/' \
  -e 's/^\(\s*\)# udev_rules = 1/\1udev_rules = 0/' "$root/etc/lvm/lvm.conf"

truncate -s "$IMAGE_BYTES" "$work/out/root.img"
mkfs.ext4 -q -F -L testvm-root -E root_owner=0:0 -d "$root" "$work/out/root.img"
echo "$kver" >"$work/out/kernel-version"
touch "$work/out/ready"
rm -rf "$out"
mv "$work/out" "$out"
# Keep the three newest builds (other branches may want theirs).
ls -1dt "$cache"/*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf
echo "$out"
