"""The operations guide names every condition reason the code can produce."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Success reasons and the abstract base are not failures a user recovers from.
NOT_FAILURES = {"Provisioned", "SnapshotReady", "InternalError"}
_REASON = re.compile(r'reason(?:: str)?\s*=\s*"([A-Z][A-Za-z]+)"')


def test_every_reason_is_documented() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "operator" / "vmdisk").rglob("*.py"))
    reasons = set(_REASON.findall(source)) - NOT_FAILURES
    assert len(reasons) > 20  # the pattern really finds them
    guide = (ROOT / "docs" / "operations.md").read_text()
    missing = sorted(r for r in reasons if f"`{r}`" not in guide)
    assert missing == [], f"add these reasons to docs/operations.md: {missing}"


def test_readme_crd_upgrade_takes_over_helms_fields() -> None:
    # Helm creates the CRDs on install under its own field manager; a server-side apply
    # of changed CRDs conflicts with it unless it forces.
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"`(kubectl apply --server-side[^`]*)`", readme)
    assert commands == [
        "kubectl apply --server-side --force-conflicts -f charts/vmdisk-operator/crds/"
    ]
