"""dm-crypt with LUKS2 through ``cryptsetup``; the key travels only on stdin.

Why LUKS2 and not plain dm-crypt: the header records cipher, key size and
data offset, so opening never depends on flags remembered elsewhere; a
wrong key is refused (plain mode would happily map garbage and a guest
would write over it); key slots allow rotation without re-encrypting.

The key is given to cryptsetup as ``--key-file=-`` on standard input and
never appears in argv, logs, status or events.  The runner's stdin is
text, so the passphrase is the key's bytes in lowercase hex: any binary
Secret value works unchanged.  To open a volume by hand::

    kubectl get secret S -o jsonpath='{.data.K}' | base64 -d | xxd -p | tr -d '\\n' \\
      | cryptsetup open --key-file=- /dev/VG/LV NAME

The key derivation is argon2id with fixed cost (4 passes, 64 MiB, one
thread) instead of cryptsetup's default two-second benchmark: the keys are
machine-made secrets (use at least 32 random bytes), where stretching adds
little, and a node formatting many volumes at once should not stall or
run out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PermanentError
from .lvm import NO_UDEV, Runner, device_mapper_error
from .run import CommandError, run

HEADER_BYTES = 16 * 1024 * 1024  # LUKS2 data offset, fixed with --offset
_OFFSET_SECTORS = str(HEADER_BYTES // 512)
PBKDF_MEMORY_KIB = 65536
_WRONG_KEY = 2  # cryptsetup's exit code for "no key available with this passphrase"


class WrongKey(PermanentError):
    reason = "EncryptionKeyMismatch"


def passphrase(key: bytes) -> str:
    """What cryptsetup reads on stdin for ``key``."""
    return key.hex()


@dataclass(frozen=True)
class Crypt:
    runner: Runner = run
    mapper_dir: Path = Path("/dev/mapper")
    timeout: float = 120.0
    pbkdf_memory_kib: int = PBKDF_MEMORY_KIB  # argon2id memory cost of new key slots

    def _run(self, *argv: str, key: bytes | None = None) -> None:
        stdin = None if key is None else passphrase(key)
        try:
            # NO_UDEV: cryptsetup makes its mappings through libdevmapper too.
            self.runner(["cryptsetup", *argv], timeout=self.timeout, input_data=stdin, env=NO_UDEV)
        except CommandError as exc:
            unavailable = device_mapper_error(exc.stderr)
            if unavailable is not None:
                raise unavailable from exc
            raise

    def path(self, mapping: str) -> Path:
        return self.mapper_dir / mapping

    def is_open(self, mapping: str) -> bool:
        return self.path(mapping).exists()

    def format(self, device: Path, key: bytes) -> None:
        """Write a LUKS2 header to ``device`` (destroys what was there)."""
        self._run(
            "luksFormat", "--batch-mode", "--type", "luks2", "--offset", _OFFSET_SECTORS,
            "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4",
            "--pbkdf-memory", str(self.pbkdf_memory_kib), "--pbkdf-parallel", "1",
            "--key-file=-", str(device), key=key,
        )  # fmt: skip

    def _open(self, device: Path, key: bytes, *options: str, mapping: str | None = None) -> None:
        """``cryptsetup open`` with the key on stdin; a wrong key is WrongKey."""
        target = [mapping] if mapping is not None else []
        try:
            self._run("open", *options, "--key-file=-", str(device), *target, key=key)
        except CommandError as exc:
            if exc.returncode == _WRONG_KEY:
                raise WrongKey(
                    f"the class's encryption key does not open the LUKS2 volume {device}"
                ) from exc
            raise

    def check_key(self, device: Path, key: bytes) -> None:
        """Raise WrongKey unless ``key`` opens ``device`` (no device-mapper needed)."""
        self._open(device, key, "--test-passphrase")

    def open(self, device: Path, mapping: str, key: bytes) -> Path:
        """Map the decrypted view of ``device`` at ``/dev/mapper/<mapping>`` (idempotent)."""
        if not self.is_open(mapping):
            # --disable-keyring: the volume key stays in the dm table, so a
            # later resize needs no key.
            self._open(device, key, "--type", "luks2", "--disable-keyring", mapping=mapping)
        return self.path(mapping)

    def resize(self, mapping: str) -> None:
        """Grow the mapping to fill its (grown) device."""
        self._run("resize", mapping)

    def close(self, mapping: str) -> None:
        """Remove the mapping; a missing one is fine."""
        if self.is_open(mapping):
            self._run("close", mapping)
