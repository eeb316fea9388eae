"""Reading encryption keys that live in files (local mode's stand-in for Secrets).

Layout: ``<state-dir>/secrets/<namespace>/<name>/<key>`` holds the raw bytes
of key ``<key>`` of Secret ``<namespace>/<name>`` (the value Kubernetes would
base64-decode), mode 0600.  The operator passes the engine a reader backed
by the Kubernetes API instead; both answer the same ``get``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import TemporaryError


class SecretMissing(TemporaryError):
    """The Secret (or its key) a class's encryption.keySecretRef names does not exist yet."""

    reason = "SecretNotFound"


def _plain(part: str) -> str:
    if part in ("", ".", "..") or "/" in part or "\0" in part:
        raise SecretMissing(f"{part!r} is not a valid Secret or key name")
    return part


@dataclass(frozen=True)
class FileSecrets:
    root: Path

    def get(self, namespace: str, name: str, key: str) -> bytes:
        path = self.root / _plain(namespace) / _plain(name) / _plain(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise SecretMissing(
                f"key {key!r} of Secret {namespace}/{name} not found (local mode reads {path})"
            ) from None
