#!/usr/bin/env bash
# Build the node agent's container image, tagged vmdisk-operator:<version>.
#
# Engine: docker where a docker daemon answers, podman otherwise (override with
# CONTAINER_ENGINE=docker|podman). With docker the base is the registry's
# debian:bookworm-slim; with podman (no registry assumed reachable) the base is
# made here by debootstrap and imported as localhost/debian:bookworm-slim, and
# rebuilt only when its inputs change. DEBIAN_IMAGE=... overrides the base.
#
# Tags vmdisk-operator:<version> and localhost/vmdisk-operator:<version> (the same
# name under podman; the chart's default repository). Prints one line on stdout,
# "<name> <image ID> <size in bytes> <engine>"; progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
tag=vmdisk-operator:$version
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

engine=${CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    engine=docker
  elif command -v podman >/dev/null; then
    engine=podman
  else
    echo "image: neither a docker daemon nor podman is available (run scripts/setup.sh)" >&2
    exit 1
  fi
fi

# podman on this kind of host: crun refuses a hybrid cgroup v1 layout and the
# default rlimits are refused, so runc, cgroupfs and explicit ulimits.
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
# The host's CA bundle (it may hold a TLS-intercepting proxy's CA) for pip in the
# build. Beside the image's own bundle, not over it: ca-certificates' postinst
# must be able to replace its file.
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
BUILD_CA=/run/host-ca-certificates.crt

# The local base: what `debian:bookworm-slim` is, made from the Debian archive.
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_TAG=localhost/debian:bookworm-slim
base_sources() {
  cat <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}
# Documentation and translations are not installed by any later apt-get (as in -slim).
base_dpkg_excludes() {
  printf '%s\n' \
    'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
    'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/lintian/*'
}

local_base() {
  # The key names every input of the base; a base with another key is rebuilt.
  local key have root
  key=$({ echo "$SUITE minbase $MIRROR"; base_sources; base_dpkg_excludes; } | sha256sum | cut -c1-16)
  have=$("${PODMAN[@]}" image inspect --format '{{index .Labels "io.vmdisk.base-key"}}' \
    "$BASE_TAG" 2>/dev/null || true)
  if [ "$have" = "$key" ]; then
    echo "image: base $BASE_TAG is current ($key)" >&2
    return
  fi
  echo "image: building base $BASE_TAG with debootstrap ($key)" >&2
  root=$(mktemp -d /var/tmp/vmdisk-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >&2
  rm -f "$root/etc/apt/sources.list"
  base_sources >"$root/etc/apt/sources.list.d/debian.sources"
  base_dpkg_excludes >"$root/etc/dpkg/dpkg.cfg.d/excludes"
  # What the excludes keep out of later packages, taken out of debootstrap's too.
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/{man,info,locale,lintian}/* \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
    "$root"/var/log/*.log "$root"/var/log/apt/*
  tar -C "$root" --numeric-owner -c . |
    "${PODMAN[@]}" import --change "LABEL io.vmdisk.base-key=$key" \
      --change 'CMD ["bash"]' - "$BASE_TAG" >&2
  rm -rf "$root"
  trap - EXIT
}

build_args=(--build-arg "VERSION=$version" --build-arg "REVISION=$revision")
if [ "$engine" = podman ]; then
  if [ -z "${DEBIAN_IMAGE:-}" ]; then
    local_base
    DEBIAN_IMAGE=$BASE_TAG
  fi
  "${PODMAN[@]}" build "${ULIMITS[@]}" --network host \
    --volume "$CA_BUNDLE:$BUILD_CA:ro" --build-arg "PIP_CERT=$BUILD_CA" \
    --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" "${build_args[@]}" \
    --tag "$tag" . >&2
  inspect=("${PODMAN[@]}" image inspect)
else
  if [ -n "${DEBIAN_IMAGE:-}" ]; then
    build_args+=(--build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE")
  fi
  docker build "${build_args[@]}" --tag "$tag" --tag "localhost/$tag" . >&2
  inspect=(docker image inspect)
fi
id=$("${inspect[@]}" --format '{{.Id}}' "$tag")
size=$("${inspect[@]}" --format '{{.Size}}' "$tag")
echo "image: localhost/$tag built with $engine: ID $id, $((size / 1000000)) MB" >&2
printf '%s %s %s %s\n' "localhost/$tag" "$id" "$size" "$engine"
