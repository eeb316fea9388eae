"""vmdisk: node-local VM disks from Kubernetes resources."""

from typing import Any


def __getattr__(name: str) -> Any:
    # The version is read from the installed metadata on first use only: every
    # command would otherwise pay for importlib.metadata at start-up.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vmdisk-operator")
    except PackageNotFoundError:  # running from a source tree without install
        return "0.0.0"
