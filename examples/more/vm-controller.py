#!/usr/bin/env python3
"""How a VM controller consumes VMDisks: paste each ``status.libvirtXML`` into a domain.

A KubeVirt-style controller (or a KubeVirt ``onDefineDomain`` hook sidecar)
does the same three steps: wait until every disk the VM names is ``Ready``
on the VM's node, take the ``<disk>`` element from ``status.libvirtXML``
unchanged (source, driver, target, boot order, QoS are all in it), and put
it under the domain's ``<devices>``.  Never rebuild the element from
``status.path``: the XML carries what the backend knows (RBD monitors and
auth, qcow2 driver type, discard, iotune).

    kubectl get vmdisks web-root web-data -o json | ./vm-controller.py domain.xml > vm.xml
    vmdisk get vmdisks -o json | ./vm-controller.py domain.xml > vm.xml   # local mode
    virsh define vm.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from typing import Any


class NotReady(Exception):
    pass


def disks_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The VMDisks of `kubectl get -o json`: one object or a List."""
    return list(document["items"]) if "items" in document else [document]


def attach(domain_xml: str, vmdisks: list[dict[str, Any]], node: str | None = None) -> str:
    """The domain with every VMDisk's <disk> under <devices>, replacing same-target disks."""
    domain = ET.fromstring(domain_xml)
    devices = domain.find("devices")
    if devices is None:
        devices = ET.SubElement(domain, "devices")
    for vmdisk in vmdisks:
        name, status = vmdisk["metadata"]["name"], vmdisk.get("status") or {}
        if status.get("phase") != "Ready" or not status.get("libvirtXML"):
            raise NotReady(f"VMDisk {name} is not Ready ({status.get('phase', 'Pending')})")
        if node is not None and status.get("nodeName") != node:
            raise NotReady(f"VMDisk {name} lives on {status.get('nodeName')}, not on {node}")
        disk = ET.fromstring(status["libvirtXML"])
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        for old in devices.findall("disk"):
            old_target = old.find("target")
            if old_target is not None and old_target.get("dev") == dev:
                devices.remove(old)
        devices.append(disk)
    return ET.tostring(domain, encoding="unicode")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as handle:
        domain_xml = handle.read()
    try:
        print(attach(domain_xml, disks_of(json.load(sys.stdin))))
    except NotReady as exc:
        print(f"not yet: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
