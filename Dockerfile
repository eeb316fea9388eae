# syntax=docker/dockerfile:1
# The vmdisk node agent: Debian bookworm's own Python, so the distribution's
# rados, rbd and libvirt bindings (not on PyPI) are the ones imported.
# Build it with `make image` (scripts/image.sh: docker, or podman with a local base).

ARG DEBIAN_IMAGE=debian:bookworm-slim

# --- build: a wheel of the package, and a venv with it and its dependencies ---
FROM ${DEBIAN_IMAGE} AS build
# A CA bundle for pip behind a TLS-intercepting proxy (scripts/image.sh mounts the
# host's); empty means pip's default. Only this stage downloads from PyPI.
ARG PIP_CERT=""
# Versions come from the bookworm release itself (no pins across point releases).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Same interpreter path as the runtime stage, so the venv can be copied over;
# --system-site-packages lets it import Debian's python3-rados/-rbd/-libvirt.
# The dependencies come first, from pyproject.toml alone: a code change reuses this layer.
COPY pyproject.toml ./
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir build==1.2.2.post1 \
    && python3 -m venv --system-site-packages /opt/vmdisk \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
    && /opt/vmdisk/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY operator ./operator
RUN /opt/build/bin/python -m build --wheel --outdir /dist . \
    && /opt/vmdisk/bin/pip install --no-cache-dir /dist/*.whl \
    && /opt/vmdisk/bin/pip uninstall --yes pip setuptools

# --- runtime: host tools, system Python bindings, the venv; no build tools ---
FROM ${DEBIAN_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-rados python3-rbd python3-libvirt \
        qemu-utils lvm2 thin-provisioning-tools cryptsetup-bin ceph-common \
        e2fsprogs xfsprogs util-linux ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/vmdisk /opt/vmdisk
ENV PATH=/opt/vmdisk/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VMDISK_STATE_DIR=/var/lib/vmdisk
# Smoke test in the image as it ships (the build stage lacks the system bindings the
# package imports): the command, the agent's imports (kopf, the Kubernetes client,
# oslo's inspector, Debian's rados/rbd/libvirt) and the tools.
RUN vmdisk --version \
    && python3 -c 'import rados, rbd, libvirt, cryptography, vmdisk.operator.main' \
    && qemu-img --version \
    && lvm version
# Last, so a new revision only relabels the image.
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="vmdisk-operator" \
      org.opencontainers.image.description="Node-local Kubernetes operator that turns VMDisk resources into VM disks and libvirt XML" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/vmdisk/vmdisk-operator" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
# Liveness (kopf) and metrics ports used by the Helm chart.
EXPOSE 8080 9102
# Privileged host work (LVM, device-mapper, dm-crypt) needs root in the container.
ENTRYPOINT ["vmdisk", "run"]
