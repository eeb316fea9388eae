"""vmdisk: node-local VM disks from Kubernetes resources."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vmdisk-operator")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
