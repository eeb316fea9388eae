"""Which VMDiskClass a disk has, and what it resolves to on this node.

A disk names a class (``spec.className``) or gets the default one (the class
annotated ``vmdisk.io/is-default-class: "true"``, else the built-in class of
``VMDISK_DEFAULT_BACKEND``).  The class's parameters are validated by its
backend's own model and bounded by the node's settings, then pinned in the
disk's status: once a disk exists, its placement, access and key never
follow later edits of the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..api.common import dump
from ..api.errors import describe_errors
from ..api.vmdisk import PinnedClass, SecretKeyRef, VMDisk
from ..api.vmdiskclass import ClassLimits, ClassMeta, ImageSources, VMDiskClass, VMDiskClassSpec
from ..backends.base import ClassParameters, DiskRef
from ..backends.registry import Registry
from ..config import Settings
from ..errors import ClassNotFound, ImmutableField, InvalidClass, InvalidSpec
from ..images.policy import SourcePolicy, default_policy
from .ports import Lookup


@dataclass(frozen=True)
class ResolvedClass:
    """A disk's class as this node applies it."""

    name: str
    backend: str
    parameters: ClassParameters
    key_ref: SecretKeyRef | None
    limits: ClassLimits
    sources: SourcePolicy

    def ref(self, disk: VMDisk) -> DiskRef:
        meta = disk.metadata
        return DiskRef(
            meta.namespace,
            meta.name,
            self.parameters.placement,
            self.key_ref is not None,
            self.parameters,
        )

    def pin(self) -> PinnedClass:
        return PinnedClass(
            name=self.name,
            parameters=dump(self.parameters),
            key_secret_ref=self.key_ref,
            limits=self.limits,
        )


def builtin_classes(registry: Registry) -> dict[str, VMDiskClass]:
    """One class per file backend, named after it, with no parameters and no limits."""
    return {
        p.name: VMDiskClass(metadata=ClassMeta(name=p.name), spec=VMDiskClassSpec(backend=p.name))
        for p in registry.plugins.values()
        if p.builtin_class
    }


def find_class(disk: VMDisk, lookup: Lookup, registry: Registry, settings: Settings) -> VMDiskClass:
    """The disk's class: by name, else the default; ClassNotFound when there is none.

    Without ``className``, a disk that names a backend gets the default class
    if it is of that backend, else the class named like the backend (the
    built-in ones for file backends), as before classes existed.
    """
    builtins = builtin_classes(registry)

    def named(name: str) -> VMDiskClass | None:
        return lookup.get_class(name) or builtins.get(name)

    wanted = disk.spec.class_name
    if wanted is not None:
        found = named(wanted)
        if found is None:
            raise ClassNotFound(f"spec.className: VMDiskClass {wanted!r} does not exist")
        return found
    defaults = sorted(c.metadata.name for c in lookup.list_classes() if c.is_default)
    if len(defaults) > 1:
        raise ClassNotFound(
            f"spec.className is not set and {len(defaults)} classes are marked default "
            f"({', '.join(defaults)}); an administrator keeps one, or the disk names its class"
        )
    default = named(defaults[0]) if defaults else named(settings.default_backend)
    backend = disk.spec.backend
    if backend is not None and (default is None or default.spec.backend != backend):
        default = named(backend)
    if default is None:
        of = f" of backend {backend!r} (nor one named {backend!r})" if backend else ""
        raise ClassNotFound(
            f"spec.className is not set and there is no default class{of}: annotate one "
            'vmdisk.io/is-default-class: "true", or name a class'
        )
    return default


def resolve_class(
    disk: VMDisk, lookup: Lookup | None, registry: Registry, settings: Settings
) -> ResolvedClass:
    """The disk's class as applied here: its pin once the disk exists, else the class now."""
    status = disk.status
    pin = status.pinned_class if status is not None else None
    if pin is not None:
        assert status is not None
        current = None
        if lookup is not None:
            current = lookup.get_class(pin.name) or builtin_classes(registry).get(pin.name)
        wanted = disk.spec.class_name
        if wanted is not None and wanted != pin.name:
            raise ImmutableField(
                f"spec.className: cannot change from {pin.name!r} to {wanted!r} after creation"
            )
        backend = status.backend or (current.spec.backend if current else None)
        if backend is None:
            raise InvalidSpec("status.class is pinned but status.backend is not")
        if disk.spec.backend is not None and disk.spec.backend != backend:
            raise ImmutableField(
                f"spec.backend: cannot change from {backend!r} to {disk.spec.backend!r} "
                "after creation"
            )
        return ResolvedClass(
            pin.name,
            backend,
            # Checked against the node's settings again: whoever can write status
            # (or an administrator narrowing the settings) gets no further than a class.
            _parameters(
                registry, backend, pin.parameters, f"class {pin.name!r}: status.class.parameters"
            ).resolve(settings),
            pin.key_secret_ref,
            # The class's limits now; the ones it had while it is gone.
            current.spec.limits if current is not None else (pin.limits or ClassLimits()),
            _policy(current, registry, settings) if current is not None else SourcePolicy(),
        )
    if lookup is None:
        raise ClassNotFound("no class lookup is available for a disk that is not created yet")
    return from_class(find_class(disk, lookup, registry, settings), disk, registry, settings)


def from_class(
    klass: VMDiskClass, disk: VMDisk, registry: Registry, settings: Settings
) -> ResolvedClass:
    """A class applied to a new disk: validated by its backend, bounded by the settings."""
    spec, name = klass.spec, klass.metadata.name
    _same_backend(disk, spec.backend)
    where = f"VMDiskClass {name!r}: spec.parameters"
    params = _parameters(registry, spec.backend, spec.parameters, where).resolve(settings)
    key = spec.encryption.key_secret_ref if spec.encryption else None
    return ResolvedClass(
        name, spec.backend, params, key, spec.limits, _policy(klass, registry, settings)
    )


def _policy(klass: VMDiskClass, registry: Registry, settings: Settings) -> SourcePolicy:
    if builtin_classes(registry).get(klass.metadata.name) == klass:
        # Built-in classes read what the node allows, as before classes existed.
        return default_policy(settings)
    return source_policy(klass.spec.image_sources, settings)


def source_policy(sources: ImageSources, settings: Settings) -> SourcePolicy:
    """The class's image sources, its file directories bounded by the agent's."""
    roots = settings.image_dirs
    dirs = tuple(
        d
        for d in (Path(x).resolve() for x in sources.file_dirs)
        if any(d.is_relative_to(root) for root in roots)
    )
    hosts = tuple(sources.allowed_hosts) if sources.allowed_hosts is not None else None
    creds = sources.registry_credentials_ref
    return SourcePolicy(
        allowed_hosts=hosts,
        file_dirs=dirs,
        require_checksum=sources.require_checksum,
        plain_http_registries=tuple(h.lower() for h in sources.plain_http_registries),
        registry_credentials=creds.name if creds is not None else None,
    )


def _same_backend(disk: VMDisk, backend: str) -> None:
    asked = disk.spec.backend
    if asked is not None and asked != backend:
        raise InvalidSpec(
            f"spec.backend: {asked!r} does not match the backend of the disk's class ({backend!r})"
        )


def _parameters(
    registry: Registry, backend: str, raw: dict[str, object], where: str
) -> ClassParameters:
    model = registry.plugin(backend).parameters
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        context, _, field = where.rpartition(": ")
        lines = "; ".join(f"{field}.{line}" for line in describe_errors(exc))
        raise InvalidClass(f"{context}: {lines}") from None
