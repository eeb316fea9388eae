"""LV and dm-crypt mapping names for VMDisks and their snapshots.  Pure.

Nova's idea, made total: every (namespace, name) maps to its own LV name,
and no two map to the same one.

* Each component is escaped with ``+`` as the escape character: ``+`` ->
  ``++``, ``_`` -> ``+u``, and ``+.`` is inserted to break words LVM
  reserves (``snapshot``, ``pvmove``, and ``cdata``, ``tmeta``, ... that
  follow an underscore).  So an escaped component never contains ``_``.
* A disk's LV is ``<ns>_<name>`` (one ``_``); a snapshot's is
  ``<ns>_<name>_<snapshot>`` (two).  Decoding is unambiguous, hence no
  collisions.
* Names too long for LVM or device-mapper become ``<prefix>+h<hash>``,
  where ``+h`` never comes out of the escaping: still no collisions, short
  and long forms never meet.

The LVs also carry tags with the plain names, so inventory never decodes.
"""

from __future__ import annotations

import hashlib

# Words LVM refuses inside LV names (lib/misc/lvm-string.c).  The suffix
# words only matter after "_", which in our names starts a component.
_ANYWHERE = ("snapshot", "pvmove")
_AFTER_UNDERSCORE = (
    "cdata", "cmeta", "corig", "cpool", "cvol", "imeta", "iorig", "mimage", "mlog",
    "pmspare", "rimage", "rmeta", "tdata", "tmeta", "vdata", "vorigin", "wcorig",
)  # fmt: skip
# Device-mapper names are at most 127 bytes and LVM builds "<vg>-<lv>-<layer>"
# with "-" doubled; the mapping prefix and the longest layer ("-tpool",
# "-real", "-cow") must fit too.
_DM_NAME_MAX = 127
_RESERVE = len("vmdisk_") + len("-tpool") + 1
_HASH_LEN = 24


def escape(component: str) -> str:
    """One name component, with no ``_`` and no LVM-reserved word."""
    out = component.replace("+", "++").replace("_", "+u")
    for word in _ANYWHERE:
        out = out.replace(word, word[:1] + "+." + word[1:])
    for word in _AFTER_UNDERSCORE:
        if out.startswith(word):
            out = word[:1] + "+." + word[1:] + out[len(word) :]
    return out


def dm_escape(name: str) -> str:
    """How device-mapper spells an LVM name part: ``-`` doubled."""
    return name.replace("-", "--")


def _budget(vg: str) -> int:
    return _DM_NAME_MAX - _RESERVE - len(dm_escape(vg))


def _fit(vg: str, plain: str, parts: tuple[str, ...]) -> str:
    budget = min(_budget(vg), 120)
    if len(dm_escape(plain)) <= budget:
        return plain
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:_HASH_LEN]
    head = escape(parts[0])[:16].rstrip("+")
    return f"{head}+h{digest}"


def disk_lv(vg: str, namespace: str, name: str) -> str:
    """The LV name of VMDisk ``namespace/name`` in volume group ``vg``."""
    return _fit(vg, f"{escape(namespace)}_{escape(name)}", (namespace, name))


def snapshot_lv(vg: str, namespace: str, name: str, snapshot: str) -> str:
    """The LV name of snapshot ``snapshot`` of VMDisk ``namespace/name``."""
    plain = f"{escape(namespace)}_{escape(name)}_{escape(snapshot)}"
    return _fit(vg, plain, (namespace, name, snapshot))


def crypt_mapping(vg: str, lv: str) -> str:
    """The dm-crypt mapping name of an encrypted LV: ``vmdisk_<vg>-<lv>``, LVM-style."""
    return f"vmdisk_{dm_escape(vg)}-{dm_escape(lv)}"
