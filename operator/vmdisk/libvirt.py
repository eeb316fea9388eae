"""libvirt ``<disk>`` and ``<filesystem>`` XML for a disk a backend describes.

Rendering is pure: a ``DiskLocation`` (where the bytes are) plus a
``LibvirtSpec`` (how the guest sees them) become one XML element, built with
ElementTree so that paths and names are always escaped, and laid out the same
way every time so the status only changes when the disk does.

``validate_disk_xml`` is the one function here that does I/O: it asks libvirt
itself whether a device element is valid, by defining a throwaway domain with
schema validation on.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import PurePosixPath

from .api.vmdisk import IoTune, LibvirtSpec
from .backends.base import DiskLocation, NetworkHost
from .errors import InvalidSpec, UnstartableDevice

# QEMU's driver for the ploop layout is "parallels"; libvirt's schema calls the
# same format "ploop" and translates it back when it starts QEMU.
_LIBVIRT_FORMATS = {"parallels": "ploop"}

# Secret usage type libvirt expects per network protocol.
_SECRET_TYPES = {"rbd": "ceph"}

# IoTune field names are libvirt's element names; this is libvirt's own order.
_IOTUNE_ELEMENTS = (
    "total_bytes_sec",
    "read_bytes_sec",
    "write_bytes_sec",
    "total_iops_sec",
    "read_iops_sec",
    "write_iops_sec",
)

_INDENT = "  "


def check_device(location: DiskLocation, spec: LibvirtSpec) -> None:
    """Refuse device combinations QEMU's libvirt driver will not start.

    libvirt's schema (and so the in-process test driver) accepts these; a
    real domain start refuses them (tests/test_device_rules.py starts every
    combination in a real libvirtd to keep this list honest):

    * ``device: cdrom`` on ``bus: virtio``: virtio-blk has no ejectable media.
    * ``device: lun`` on any disk vmdisk makes: SCSI passthrough (scsi-block)
      needs a device that answers SCSI commands (SG_IO), and files, LVs (a
      device-mapper device) and RBD images do not; a loop device is refused
      by QEMU the same way.
    """
    if spec.device == "cdrom" and spec.bus == "virtio":
        raise UnstartableDevice(
            "spec.libvirt.bus: a cdrom cannot be on the virtio bus (virtio-blk has no "
            "ejectable media); use bus: scsi, sata, ide or usb"
        )
    if spec.device == "lun":
        raise UnstartableDevice(
            f"spec.libvirt.device: lun passes SCSI commands through to a SCSI device, but "
            f"this disk is a {location.type} ({location.path}) that answers none; "
            "use device: disk (bus: scsi gives the guest a SCSI disk)"
        )


def render_disk(location: DiskLocation, spec: LibvirtSpec) -> str:
    """The ``<disk>`` element a VM controller pastes into its domain (startable by QEMU)."""
    check_device(location, spec)
    return _disk_xml(location, spec)


def _disk_xml(location: DiskLocation, spec: LibvirtSpec) -> str:
    """The ``<disk>`` element, unchecked (the device rules' tests start refused ones too)."""
    disk = ET.Element("disk", type=location.type, device=spec.device)
    driver = ET.SubElement(disk, "driver", name="qemu", type=_libvirt_format(location.format))
    driver.set("cache", spec.cache)
    if spec.device != "cdrom":  # a read-only medium has nothing to discard
        driver.set("discard", spec.discard)
    driver.set("io", spec.effective_io)

    disk.append(_disk_source(location))
    ET.SubElement(disk, "target", dev=spec.effective_target, bus=spec.bus)
    iotune = _iotune(spec.iotune)
    if iotune is not None:
        disk.append(iotune)
    if spec.boot_order is not None:
        ET.SubElement(disk, "boot", order=str(spec.boot_order))
    if spec.device == "cdrom":
        ET.SubElement(disk, "readonly")
    if spec.unit is not None:
        # Only with an explicit unit: otherwise libvirt assigns addresses, and
        # pinning the unit is what lets one virtio-scsi controller hold 256 disks.
        # The VM controller owns SCSI controller 0.
        ET.SubElement(
            disk, "address", type="drive", controller="0", bus="0", target="0", unit=str(spec.unit)
        )
    return _serialize(disk)


def render_filesystem(location: DiskLocation, target_dir: str) -> str:
    """The ``<filesystem>`` element that mounts the disk at ``target_dir`` in a container.

    File disks go through the host driver ``location.fs_driver`` names, else
    ``loop`` for raw, ``ploop`` for ploop and ``nbd`` for anything else (qcow2).
    Block devices are mounted directly.
    """
    if location.type == "network":
        raise ValueError(f"a network disk ({location.path}) cannot back a <filesystem>")
    fs = ET.Element("filesystem", type=location.type)
    if location.type == "block":
        ET.SubElement(fs, "source", dev=location.path)
    else:
        fmt = _libvirt_format(location.format)
        driver = location.fs_driver or _default_fs_driver(fmt)
        ET.SubElement(fs, "driver", type=driver, format=fmt)
        # The ploop driver mounts a ploop bundle: the directory holding root.hds
        # and its DiskDescriptor.xml, not the data file QEMU opens.
        path = str(PurePosixPath(location.path).parent) if driver == "ploop" else location.path
        ET.SubElement(fs, "source", file=path)
    ET.SubElement(fs, "target", dir=target_dir)
    return _serialize(fs)


CONTAINER_ROOT = "/"


def container_filesystem(location: DiskLocation) -> str | None:
    """The ``<filesystem>`` that makes the disk a container's root, where that makes sense.

    File and block disks can be mounted by the host for a container (Nova's
    ``libvirt_fs_info`` for LXC); a network image (rbd) cannot, so None.
    """
    if location.type == "network":
        return None
    return render_filesystem(location, CONTAINER_ROOT)


def validate_disk_xml(xml: str, uri: str = "test:///default") -> None:
    """Raise ValueError with libvirt's message unless ``xml`` is a valid device.

    ``xml`` is one ``<disk>`` or ``<filesystem>`` element. It is checked against
    libvirt's RNG schema and parser by defining a throwaway domain holding it on
    the connection at ``uri`` (the in-process test driver by default), which is
    undefined again at once. A connection that cannot be opened raises
    ``libvirt.libvirtError``: that says nothing about the XML.
    """
    import libvirt  # lazily: only validation needs the bindings

    try:
        device = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"not well-formed XML: {exc}") from exc

    conn = libvirt.open(uri)
    try:
        domain_xml = _probe_domain(device, _domain_type(conn.getType()))
        try:
            domain = conn.defineXMLFlags(domain_xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        except libvirt.libvirtError as exc:
            raise ValueError(exc.get_error_message()) from exc
        domain.undefine()
    finally:
        conn.close()


def _libvirt_format(fmt: str) -> str:
    return _LIBVIRT_FORMATS.get(fmt, fmt)


def _default_fs_driver(libvirt_format: str) -> str:
    if libvirt_format == "raw":
        return "loop"
    if libvirt_format == "ploop":
        return "ploop"
    return "nbd"


def _disk_source(location: DiskLocation) -> ET.Element:
    if location.type == "file":
        return ET.Element("source", file=location.path)
    if location.type == "block":
        return ET.Element("source", dev=location.path)
    if location.protocol is None:
        raise ValueError(f"network disk {location.path} has no protocol")
    source = ET.Element("source", protocol=location.protocol, name=location.path)
    for host in location.hosts:
        source.append(_host(host))
    if location.auth_username is not None:
        source.append(_auth(location.protocol, location.auth_username, location.secret_uuid))
    return source


def _host(host: NetworkHost) -> ET.Element:
    # libvirt wants a bare IPv6 address in name= (its schema rejects "[::1]");
    # it adds the brackets itself where QEMU needs them.
    name = host.name
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    element = ET.Element("host", name=name)
    if host.port is not None:
        element.set("port", str(host.port))
    return element


def _auth(protocol: str, username: str, secret_uuid: str | None) -> ET.Element:
    # Inside <source>: libvirt's current schema; it keeps the secret with the
    # source it unlocks (a backing chain can have one per layer).
    secret_type = _SECRET_TYPES.get(protocol)
    if secret_type is None:
        raise ValueError(f"no libvirt secret type known for protocol {protocol!r}")
    if secret_uuid is None:
        raise InvalidSpec(
            f"{protocol} user {username!r} needs a libvirt secret UUID "
            "(spec.rbd.secretUUID or VMDISK_RBD_SECRET_UUID)"
        )
    auth = ET.Element("auth", username=username)
    ET.SubElement(auth, "secret", type=secret_type, uuid=secret_uuid)
    return auth


def _iotune(tune: IoTune) -> ET.Element | None:
    limits = [(name, getattr(tune, name)) for name in _IOTUNE_ELEMENTS]
    set_limits = [(name, value) for name, value in limits if value]  # 0 means unlimited
    if not set_limits:
        return None
    iotune = ET.Element("iotune")
    for name, value in set_limits:
        ET.SubElement(iotune, name).text = str(value)
    return iotune


def _serialize(element: ET.Element) -> str:
    ET.indent(element, space=_INDENT)
    return ET.tostring(element, encoding="unicode")


def _domain_type(driver: str) -> str:
    # The test driver wants its own type; QEMU's plain emulation exists wherever QEMU does.
    return "test" if driver == "Test" else "qemu"


def _probe_domain(device: ET.Element, domain_type: str) -> str:
    domain = ET.Element("domain", type=domain_type)
    ET.SubElement(domain, "name").text = f"vmdisk-validate-{uuid.uuid4().hex[:12]}"
    ET.SubElement(domain, "memory", unit="MiB").text = "64"
    ET.SubElement(ET.SubElement(domain, "os"), "type").text = "hvm"
    ET.SubElement(domain, "devices").append(device)
    return ET.tostring(domain, encoding="unicode")
