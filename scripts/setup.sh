#!/usr/bin/env bash
# Install everything the demo and the test suite need. Idempotent and
# non-interactive; safe to run on every `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(
  qemu-utils qemu-system-x86 qemu-block-extra
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients python3-libvirt
  libxml2-utils python3-venv python3-dev
  e2fsprogs xfsprogs util-linux curl wget strace  # strace: tests observe fsyncs
  gzip xz-utils zstd bzip2  # compressed test images, made by the real compressors
  ceph-mon ceph-osd ceph-mgr ceph-common python3-rados python3-rbd
  lvm2 cryptsetup thin-provisioning-tools
  podman runc debootstrap  # debootstrap: the container image's base and the test VM
  docker-registry skopeo  # a real OCI registry and its client, for oci:// image sources
)

missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# Empty package lists (a cleaned image) also need an update: the tests resolve the
# container image's packages with apt-cache.
if [ "${#missing[@]}" -gt 0 ] || ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -qq
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# QEMU started by the tests' libvirtd runs as root (no libvirt-qemu
# ownership dance over files made by the tests).
if [ -f /etc/libvirt/qemu.conf ] && ! grep -q '^user = "root"' /etc/libvirt/qemu.conf; then
  printf 'user = "root"\ngroup = "root"\n' >> /etc/libvirt/qemu.conf
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# The Kubernetes API servers and etcd the tests run against (built from Go
# modules, cached in ~/.cache/vmdisk-kube).
./scripts/build-kube.sh

# The test VM for what needs device-mapper (this kernel may lack it): built
# once per change of its inputs, cached outside the work tree.
./scripts/testvm/build.sh >/dev/null
