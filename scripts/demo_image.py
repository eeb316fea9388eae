"""Write the demo's disk image: deterministic bytes, so the examples can pin its checksum."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

MiB = 1024 * 1024


def main(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as handle:
        handle.truncate(64 * MiB)
        # A recognisable first sector and a few data blocks; the rest stays sparse.
        handle.write(b"vmdisk demo image".ljust(512, b"\0"))
        for block in range(8):
            handle.seek((block * 7 + 1) * MiB)
            handle.write(hashlib.sha256(str(block).encode()).digest() * 4096)
    print(f"sha256:{hashlib.sha256(target.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
