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


def _reason_classes() -> dict[str, bool]:
    """Every error class's reason, and whether it is permanent."""
    import importlib
    import pkgutil

    import vmdisk
    from vmdisk.errors import VMDiskError

    for module in pkgutil.walk_packages(vmdisk.__path__, "vmdisk."):
        importlib.import_module(module.name)
    found: dict[str, bool] = {}
    todo = [VMDiskError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        found[cls.reason] = cls.permanent
    return found


def test_documented_permanence_matches_the_code() -> None:
    """A reason listed under a "(permanent)" heading is never retried, and vice versa."""
    permanent = _reason_classes()
    assert permanent["CommandFailed"] is True and permanent["DownloadFailed"] is False
    wrong = []
    heading = ""
    for line in (ROOT / "docs" / "operations.md").read_text().splitlines():
        if line.startswith("### "):
            heading = line
        elif line.startswith("| `") and ("(permanent)" in heading or "(temporary" in heading):
            for reason in re.findall(r"`([A-Z][A-Za-z]+)`", line.split("|")[1]):
                expected = "(permanent)" in heading
                if reason in permanent and permanent[reason] != expected:
                    wrong.append(f"{reason} under {heading!r}")
    assert wrong == [], f"move these reasons in docs/operations.md: {wrong}"


def test_readme_crd_upgrade_takes_over_helms_fields() -> None:
    # Helm creates the CRDs on install under its own field manager; a server-side apply
    # of changed CRDs conflicts with it unless it forces.
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"`(kubectl apply --server-side[^`]*)`", readme)
    assert commands == [
        "kubectl apply --server-side --force-conflicts -f charts/vmdisk-operator/crds/"
    ]
