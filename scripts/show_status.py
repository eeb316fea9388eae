"""Print the interesting part of each VMDisk (from `vmdisk get -o yaml` on stdin)."""

from __future__ import annotations

import sys

import yaml

FIELDS = ("phase", "backend", "format", "path", "virtualSize", "actualSize", "baseImage")

for obj in yaml.safe_load_all(sys.stdin):
    status = obj.get("status", {})
    print(f"--- VMDisk {obj['metadata']['name']}")
    for field in FIELDS:
        if field in status:
            print(f"  {field}: {status[field]}")
    ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)
    if ready:
        print(f"  Ready: {ready['status']} ({ready['reason']}) {ready['message']}")
    if "libvirtXML" in status:
        print("  libvirtXML:")
        for line in status["libvirtXML"].splitlines():
            print(f"    {line}")
