"""A Kubernetes API server for the tests: kmock's KubernetesEmulator on loopback.

Load as a pytest plugin (``pytest_plugins = ["kube"]``).  The fixture
``api_server`` runs `ApiServer` in a background thread on 127.0.0.1 (a real
HTTP port, so the operator can run as its own process) and hands the test a
synchronous `KubeApi` client; ``kubeconfig`` writes a kubeconfig for it that
kopf and kubectl accept.

kmock serves the HTTP port and API discovery, and keeps every object version
in ``ApiServer.objects``.  `ApiServer` fills what kmock leaves out (see
DESIGN.md): it serves every resource request itself, with metadata.uid,
creationTimestamp, generation and a monotonic resourceVersion; the status
subresource; finalizers and deletionTimestamp; merge and JSON patches with
optimistic concurrency; label and field selectors; watches that resume from a
resourceVersion, with bookmarks; pruning and CRD validation (``schema.py``) of
every write to our own resources, refused with a 422 naming the field.
Requests are answered from per-resource indexes, so their cost does not grow
with the number of objects held (a list or a watch start is linear in the
objects of its resource).
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import concurrent.futures
import contextlib
import copy
import datetime
import json
import logging
import re
import secrets
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp.web
import attrs
import jsonpatch
import kmock
import pytest
import urllib3
import yaml

from schema import CRDValidationError, validate_against_crd
from vmdisk.api.crd import crds
from vmdisk.backends.registry import PLUGINS

Obj = dict[str, Any]
HARNESS_AGENT = "vmdisk-tests-harness"
_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
_LOG_SIZE = 100_000  # watch events kept per resource for resuming from a resourceVersion
logger = logging.getLogger(__name__)


class _Refusal(Exception):
    """A request the API server refuses, rendered as a Kubernetes Status."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def response(self) -> aiohttp.web.Response:
        status: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
        status.update(message=self.message, reason=self.reason, code=self.code)
        if self.details:
            status["details"] = self.details
        return aiohttp.web.json_response(status, status=self.code)


@dataclass(frozen=True)
class Kind:
    """What the server knows of one resource: discovery, schema and printer columns."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    crd: bool = False  # validated against tests/schema.py, status is a subresource
    schema: Obj | None = None
    selectable: tuple[str, ...] = ()  # field-selector paths beyond metadata.name/namespace
    columns: tuple[Obj, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)


@dataclass(frozen=True)
class StatusWrite:
    """One status written through the status subresource, as stored."""

    plural: str
    namespace: str | None
    name: str
    resource_version: str
    status: Obj


@dataclass(frozen=True)
class _Route:
    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def _route(path: str) -> _Route | None:
    """Parse a resource URL; None for discovery and other non-resource paths."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    ns_subresource = group == "" and len(rest) == 3 and rest[2] in ("status", "finalize")
    if rest[0] == "namespaces" and len(rest) >= 3 and not ns_subresource:
        namespace, rest = rest[1], rest[2:]
    if len(rest) > 3:
        return None
    rest += [None] * (3 - len(rest))  # type: ignore[list-item]
    return _Route(group, version, rest[0], namespace, rest[1], rest[2])


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(timestamp: Any) -> str | None:
    try:
        then = datetime.datetime.strptime(str(timestamp), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    seconds = int(time.time() - then.replace(tzinfo=datetime.UTC).timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _prune(schema: Obj, value: Any, path: str, dropped: list[str]) -> Any:
    """Drop fields the structural schema does not know, as the apiserver does."""
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        keep = schema.get("x-kubernetes-preserve-unknown-fields", False)
        result = {}
        for key, sub in value.items():
            where = f"{path}.{key}".lstrip(".")
            if path == "" and key == "metadata":
                result[key] = sub  # metadata is the apiserver's, not the schema's
            elif props is not None and key in props:
                result[key] = _prune(props[key], sub, where, dropped)
            elif isinstance(extra, dict):
                result[key] = _prune(extra, sub, where, dropped)
            elif keep or extra is True:
                result[key] = sub
            else:
                dropped.append(where)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [
            _prune(schema["items"], item, f"{path}[{i}]", dropped) for i, item in enumerate(value)
        ]
    return value


def _lookup(obj: Any, path: str) -> Any:
    for part in path.strip(".").split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else "" if value is None else str(value)


Predicate = Callable[[Obj], bool]
_LABEL_TERM = re.compile(
    r"\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*"
)


def label_selector(text: str) -> Predicate:
    """Compile a label selector (=, ==, !=, in, notin, exists, !exists)."""
    terms: list[Predicate] = []
    for term in re.split(r",(?![^()]*\))", text):
        if not term.strip():
            continue
        m = _LABEL_TERM.fullmatch(term)
        if not m or (m["neg"] and (m["op"] or m["setop"])):
            raise _Refusal(400, "BadRequest", f"unable to parse requirement: {term!r}")
        key, op, value, setop = m["key"], m["op"], m["value"], m["setop"]
        values = {v.strip() for v in (m["values"] or "").split(",")}

        def check(
            labels: Mapping[str, str],
            key: str = key,
            op: str | None = op,
            value: str = value,
            setop: str | None = setop,
            values: set[str] = values,
            neg: bool = bool(m["neg"]),
        ) -> bool:
            if op in ("=", "=="):
                return labels.get(key) == value
            if op == "!=":
                return labels.get(key) != value
            if setop == "in":
                return labels.get(key) in values
            if setop == "notin":
                return labels.get(key) not in values
            return (key in labels) != neg

        terms.append(check)
    return lambda obj: all(t(obj.get("metadata", {}).get("labels") or {}) for t in terms)


def field_selector(text: str, kind: Kind) -> Predicate:
    """Compile a field selector over metadata.name/namespace and the CRD's selectableFields."""
    allowed = {"metadata.name", "metadata.namespace", *kind.selectable}
    terms: list[Predicate] = []
    for term in text.split(","):
        if not term.strip():
            continue
        m = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*", term)
        if not m:
            raise _Refusal(400, "BadRequest", f"invalid field selector: {term!r}")
        path, op, value = m.groups()
        if kind.crd and path not in allowed:
            raise _Refusal(400, "BadRequest", f'field label not supported: "{path}"')

        def check(obj: Obj, path: str = path, equal: bool = op != "!=", value: str = value) -> bool:
            return (_text(_lookup(obj, path)) == value) == equal

        terms.append(check)
    return lambda obj: all(t(obj) for t in terms)


@dataclass
class _Watcher:
    namespace: str | None
    name: str | None
    match: Predicate
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)

    def wants(self, obj: Obj) -> bool:
        meta = obj.get("metadata", {})
        return (
            (self.namespace is None or meta.get("namespace") == self.namespace)
            and (self.name is None or meta.get("name") == self.name)
            and self.match(obj)
        )


def default_kinds() -> list[Kind]:
    """The resources kopf discovers and posts to, plus our two CRDs from vmdisk.api.crd."""
    kinds = [
        Kind("", "v1", "namespaces", "Namespace", False, "namespace", ("ns",)),
        Kind("", "v1", "events", "Event", True, "event", ("ev",)),
        Kind("events.k8s.io", "v1", "events", "Event", True, "event", ("ev",)),
        Kind(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            False,
            "customresourcedefinition",
            ("crd", "crds"),
        ),
    ]
    for crd in crds(PLUGINS):
        spec, names = crd["spec"], crd["spec"]["names"]
        for ver in spec["versions"]:
            kinds.append(
                Kind(
                    spec["group"],
                    ver["name"],
                    names["plural"],
                    names["kind"],
                    spec["scope"] == "Namespaced",
                    names.get("singular", ""),
                    tuple(names.get("shortNames", ())),
                    tuple(names.get("categories", ())),
                    crd=True,
                    schema=ver["schema"]["openAPIV3Schema"],
                    selectable=tuple(
                        f["jsonPath"].lstrip(".") for f in ver.get("selectableFields", ())
                    ),
                    columns=tuple(ver.get("additionalPrinterColumns", ())),
                )
            )
    return kinds


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the API machinery a real operator relies on (module docstring)."""

    bookmark_interval: float = 20.0
    kinds: dict[tuple[str, str, str], Kind] = attrs.field(factory=dict)
    statuses: list[StatusWrite] = attrs.field(factory=list)  # every status write, in order
    rejections: list[Obj] = attrs.field(factory=list)  # refused writes of non-harness clients
    pruned: list[str] = attrs.field(factory=list)  # unknown fields dropped from writes
    failures: list[str] = attrs.field(factory=list)  # tracebacks of harness bugs (500s)
    verbs: collections.Counter[str] = attrs.field(factory=collections.Counter)
    harness_verbs: collections.Counter[str] = attrs.field(factory=collections.Counter)
    details: collections.Counter[str] = attrs.field(factory=collections.Counter)
    _rv: int = 0
    _store: dict[tuple[str, str, str], dict[tuple[str | None, str], Obj]] = attrs.field(
        factory=lambda: collections.defaultdict(dict)
    )
    _log: dict[tuple[str, str, str], collections.deque[tuple[int, Obj]]] = attrs.field(
        factory=lambda: collections.defaultdict(lambda: collections.deque(maxlen=_LOG_SIZE))
    )
    _log_floor: dict[tuple[str, str, str], int] = attrs.field(
        factory=lambda: collections.defaultdict(int)
    )
    _watchers: dict[tuple[str, str, str], set[int]] = attrs.field(
        factory=lambda: collections.defaultdict(set)
    )
    _watches: dict[int, _Watcher] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for kind in list(self.kinds.values()) or default_kinds():
            self.register(kind)
        self.register_objects()

    def register(self, kind: Kind) -> None:
        """Serve `kind` and announce it in discovery."""
        self.kinds[kind.key] = kind
        info = self.resources[f"{kind.api_version}/{kind.plural}"]
        info.kind, info.singular, info.namespaced = kind.kind, kind.singular, kind.namespaced
        info.verbs, info.shortnames, info.categories = set(_VERBS), set(kind.short_names), set()
        info.categories = set(kind.categories)
        info.subresources = {"status"} if kind.crd or kind.plural == "namespaces" else set()

    def register_objects(self) -> None:
        """Pre-create the default namespaces and the CRD objects (kopf watches CRDs)."""
        for ns in ("default", "kube-system"):
            self.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for crd in crds(PLUGINS):
            self.put_object(crd)

    def put_object(self, obj: Obj) -> Obj:
        """Store `obj` directly (no admission), as if created; for seeding."""
        kind = self._kind_of(obj)
        meta = obj.setdefault("metadata", {})
        self._stamp(meta)
        self._save(kind, obj, "ADDED")
        return obj

    def _kind_of(self, obj: Obj) -> Kind:
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        for kind in self.kinds.values():
            if (kind.group, kind.version, kind.kind) == (group, version, obj.get("kind")):
                return kind
        raise KeyError(f"{obj.get('apiVersion')} {obj.get('kind')} is not served")

    # --- request handling -------------------------------------------------------------------

    def _get_resources(self) -> list[kmock.resource]:
        # The declared ones only: kmock's own scan over all objects costs O(objects).
        return [kmock.resource(key) for key in self.resources]

    async def _serve_version(self, request: kmock.Request) -> Any:
        """kmock's resource list, with subresources as the apiserver lists them."""
        answer = cast(Obj, await super()._serve_version(request))
        for entry in answer.get("resources", ()):
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[], verbs=["get", "patch", "update"])
        return answer

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        route = _route(raw.path)
        if route is None:  # discovery: kmock's own
            return await super().__call__(raw)
        harness = raw.headers.get("User-Agent", "").startswith(HARNESS_AGENT)
        try:
            return await self._serve(raw, route, harness)
        except _Refusal as refusal:
            if not harness and raw.method != "GET":
                self.rejections.append(json.loads(refusal.response().text or "{}"))
            return refusal.response()
        except Exception:
            self.failures.append(traceback.format_exc())
            logger.exception("API server failure on %s %s", raw.method, raw.path_qs)
            return _Refusal(500, "InternalError", traceback.format_exc()).response()

    async def _serve(
        self, raw: aiohttp.web.BaseRequest, route: _Route, harness: bool
    ) -> aiohttp.web.StreamResponse:
        kind = self.kinds.get((route.group, route.version, route.plural))
        sub = route.subresource
        if kind is None or sub not in (None, "status") or (sub and not route.name):
            raise _Refusal(404, "NotFound", "the server could not find the requested resource")
        namespace = route.namespace if kind.namespaced else None
        if kind.namespaced and route.name and namespace is None:
            raise _Refusal(404, "NotFound", "the server could not find the requested resource")
        params = dict(raw.query)
        verb = {
            "GET": "get" if route.name else "list",
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if route.name else "deletecollection",
        }.get(raw.method, "")
        if verb in ("get", "list") and params.get("watch") in ("true", "1"):
            verb = "watch"
        if (route.name is None and verb in ("update", "patch")) or (
            route.name and verb == "create"
        ):
            verb = ""
        if not verb or verb == "deletecollection":
            raise _Refusal(405, "MethodNotAllowed", f"{raw.method} is not supported here")
        (self.harness_verbs if harness else self.verbs)[verb] += 1
        if not harness:
            self.details[f"{verb} {route.plural}{'/' + sub if sub else ''}"] += 1
        body = await raw.read()
        key = (namespace, route.name or "")
        if verb == "watch":
            return await self._watch(raw, kind, namespace, route.name, params)
        if verb == "list":
            return self._respond(raw, kind, self._list(kind, namespace, params))
        if verb == "get":
            return self._respond(raw, kind, self._current(kind, key))
        if verb == "create":
            obj = self._create(kind, namespace, self._parse(body))
            return aiohttp.web.json_response(obj, status=201)
        if verb == "update":
            new = self._parse(body)
            _check_rv(new, self._current(kind, key))
            return aiohttp.web.json_response(self._update(kind, key, new, sub))
        if verb == "patch":
            return aiohttp.web.json_response(self._patch(kind, key, raw, body, namespace, sub))
        return aiohttp.web.json_response(self._delete(kind, key, self._parse(body or b"{}")))

    @staticmethod
    def _parse(body: bytes) -> Obj:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise _Refusal(400, "BadRequest", f"invalid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise _Refusal(400, "BadRequest", "the body must be a JSON object")
        return data

    def _current(self, kind: Kind, key: tuple[str | None, str]) -> Obj:
        try:
            return self._store[kind.key][key]
        except KeyError:
            raise _Refusal(
                404,
                "NotFound",
                f'{kind.plural}.{kind.group} "{key[1]}" not found',
                {"name": key[1], "group": kind.group, "kind": kind.plural},
            ) from None

    def _list(self, kind: Kind, namespace: str | None, params: Mapping[str, str]) -> Obj:
        match = self._matcher(kind, params)
        items = [
            obj
            for (ns, _), obj in sorted(self._store[kind.key].items(), key=lambda i: str(i[0]))
            if (namespace is None or ns == namespace) and match(obj)
        ]
        meta: Obj = {"resourceVersion": str(self._rv)}
        offset = int(params.get("continue") or 0)
        limit = int(params.get("limit") or 0)
        if limit and offset + limit < len(items):
            meta["continue"] = str(offset + limit)
            meta["remainingItemCount"] = len(items) - offset - limit
        items = items[offset : offset + limit] if limit else items[offset:]
        return {
            "apiVersion": kind.api_version,
            "kind": f"{kind.kind}List",
            "metadata": meta,
            "items": items,
        }

    def _matcher(self, kind: Kind, params: Mapping[str, str]) -> Predicate:
        labels = label_selector(params.get("labelSelector", ""))
        fields = field_selector(params.get("fieldSelector", ""), kind)
        return lambda obj: labels(obj) and fields(obj)

    def _respond(self, raw: aiohttp.web.BaseRequest, kind: Kind, obj: Obj) -> aiohttp.web.Response:
        """JSON, or a Table for kubectl's `get` (with the CRD's printer columns)."""
        if "as=Table" not in raw.headers.get("Accept", ""):
            return aiohttp.web.json_response(obj)
        columns = [
            {"name": "Name", "type": "string", "format": "name", "jsonPath": ".metadata.name"}
        ]
        columns += [c for c in kind.columns if not c.get("priority")] or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ]
        items = obj.get("items", [obj])
        rows = [
            {
                "cells": [
                    _age(_lookup(item, c["jsonPath"]))
                    if c["type"] == "date"
                    else _lookup(item, c["jsonPath"])
                    for c in columns
                ],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": item["metadata"],
                },
            }
            for item in items
        ]
        return aiohttp.web.json_response(
            {
                "kind": "Table",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "columnDefinitions": [
                    {
                        "name": c["name"],
                        "type": c["type"],
                        "format": c.get("format", ""),
                        "description": c.get("description", ""),
                        "priority": 0,
                    }
                    for c in columns
                ],
                "rows": rows,
            }
        )

    # --- writes ---------------------------------------------------------------------------

    def _stamp(self, meta: Obj) -> None:
        self._rv += 1
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(self._rv)

    def _create(self, kind: Kind, namespace: str | None, obj: Obj) -> Obj:
        if obj.get("kind", kind.kind) != kind.kind:
            raise _Refusal(400, "BadRequest", f"kind {obj['kind']} does not match {kind.kind}")
        obj = {"apiVersion": kind.api_version, "kind": kind.kind, **obj}
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise _Refusal(400, "BadRequest", "the namespace of the object does not match")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        name = meta.get("name") or ""
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name):
            raise self._invalid(kind, name, [f"metadata.name: Invalid value: {name!r}"])
        if (namespace, name) in self._store[kind.key]:
            raise _Refusal(
                409, "AlreadyExists", f'{kind.plural}.{kind.group} "{name}" already exists'
            )
        for transient in (
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            meta.pop(transient, None)
        if kind.crd:
            obj.pop("status", None)  # the status subresource ignores status on create
        obj = self._admit(kind, obj, None)
        self._stamp(obj["metadata"])
        self._save(kind, obj, "ADDED")
        return obj

    def _patch(
        self,
        kind: Kind,
        key: tuple[str | None, str],
        raw: aiohttp.web.BaseRequest,
        body: bytes,
        namespace: str | None,
        sub: str | None,
    ) -> Obj:
        ctype = raw.content_type
        if ctype == "application/apply-patch+yaml":  # server-side apply, approximated
            patch = yaml.safe_load(body) or {}
            if key not in self._store[kind.key] and sub is None:
                return self._create(kind, namespace, patch)
            return self._update(kind, key, merge_patch(self._current(kind, key), patch), sub)
        old = self._current(kind, key)
        if ctype == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(old, json.loads(body))
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise _Refusal(422, "Invalid", f"the JSON patch was not applied: {exc}") from exc
        elif ctype == "application/merge-patch+json" or (
            ctype == "application/strategic-merge-patch+json" and not kind.crd
        ):
            patch = self._parse(body)
            _check_rv(patch, old)
            new = merge_patch(old, patch)
        else:
            raise _Refusal(415, "UnsupportedMediaType", f"the patch type {ctype} is not supported")
        return self._update(kind, key, new, sub)

    def _update(self, kind: Kind, key: tuple[str | None, str], new: Obj, sub: str | None) -> Obj:
        old = self._current(kind, key)
        if sub == "status":
            obj = copy.deepcopy(old)
            obj.pop("status", None)
            if "status" in new:
                obj["status"] = new["status"]
        else:
            obj = {**new, "apiVersion": old["apiVersion"], "kind": old["kind"]}
            meta = obj["metadata"] = dict(new.get("metadata") or {})
            if meta.get("name", key[1]) != key[1]:
                raise _Refusal(400, "BadRequest", "the name of the object does not match the URL")
            if kind.crd:
                obj.pop("status", None)
                if "status" in old:
                    obj["status"] = old["status"]
            for fixed in (
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ):
                meta.pop(fixed, None)
                if fixed in old["metadata"]:
                    meta[fixed] = old["metadata"][fixed]
            meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        obj = self._admit(kind, obj, old)
        if obj == old:
            return old  # a no-op write: no new resourceVersion, no watch event
        meta = obj["metadata"]
        if {k: v for k, v in obj.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")
        }:
            meta["generation"] = meta.get("generation", 0) + 1
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        if sub == "status":
            self.statuses.append(
                StatusWrite(
                    kind.plural,
                    key[0],
                    key[1],
                    meta["resourceVersion"],
                    copy.deepcopy(obj.get("status") or {}),
                )
            )
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._save(kind, obj, "DELETED")
        else:
            self._save(kind, obj, "MODIFIED")
        return obj

    def _delete(self, kind: Kind, key: tuple[str | None, str], options: Obj) -> Obj:
        old = self._current(kind, key)
        wanted = (options.get("preconditions") or {}).get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise _conflict(kind, key[1])
        if old["metadata"].get("deletionTimestamp"):
            return old
        obj = copy.deepcopy(old)
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if obj["metadata"].get("finalizers"):
            obj["metadata"]["deletionTimestamp"] = _now()
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            self._save(kind, obj, "MODIFIED")
        else:
            self._save(kind, obj, "DELETED")
        return obj

    def _invalid(self, kind: Kind, name: str, errors: list[str]) -> _Refusal:
        causes = []
        for line in errors:
            where, _, what = line.partition(": ")
            causes.append({"type": "FieldValueInvalid", "message": what, "field": where})
        return _Refusal(
            422,
            "Invalid",
            f'{kind.kind}.{kind.group} "{name}" is invalid: ' + "; ".join(errors),
            {"name": name, "group": kind.group, "kind": kind.kind, "causes": causes},
        )

    def _admit(self, kind: Kind, obj: Obj, old: Obj | None) -> Obj:
        """Prune unknown fields and validate against the CRD (defaults applied)."""
        if not kind.crd or kind.schema is None:
            return obj
        dropped: list[str] = []
        obj = _prune(kind.schema, obj, "", dropped)
        self.pruned.extend(f"{kind.plural}/{obj['metadata'].get('name')}: {d}" for d in dropped)
        try:
            return validate_against_crd(obj, old)
        except CRDValidationError as exc:
            raise self._invalid(kind, obj["metadata"].get("name", ""), exc.errors) from None

    def _save(self, kind: Kind, obj: Obj, event: str) -> None:
        """Store a new version (or remove it) and tell the watchers; never awaits."""
        meta = obj["metadata"]
        key = (meta.get("namespace"), meta["name"])
        objects = self.objects  # kmock's versioned store, for kmock-style assertions
        okey = (kmock.resource(kind.group, kind.version, kind.plural), key[0], key[1])
        if okey in objects:
            objects[okey].create(obj)
        else:
            objects[okey] = obj
        if event == "DELETED":
            objects[okey].delete()
            self._store[kind.key].pop(key, None)
        else:
            self._store[kind.key][key] = obj
        log = self._log[kind.key]
        if len(log) == log.maxlen:
            self._log_floor[kind.key] = log[0][0]
        log.append((int(meta["resourceVersion"]), {"type": event, "object": obj}))
        for wid in self._watchers[kind.key]:
            watcher = self._watches[wid]
            if watcher.wants(obj):
                watcher.queue.put_nowait({"type": event, "object": obj})

    # --- watching -------------------------------------------------------------------------

    async def _watch(
        self,
        raw: aiohttp.web.BaseRequest,
        kind: Kind,
        namespace: str | None,
        name: str | None,
        params: Mapping[str, str],
    ) -> aiohttp.web.StreamResponse:
        watcher = _Watcher(namespace, name, self._matcher(kind, params))
        since = params.get("resourceVersion", "")
        initial = params.get("sendInitialEvents") == "true" or since in ("", "0")
        events: list[Obj] = []
        if initial:
            objs = sorted(
                self._store[kind.key].values(), key=lambda o: int(o["metadata"]["resourceVersion"])
            )
            events = [{"type": "ADDED", "object": obj} for obj in objs if watcher.wants(obj)]
            if params.get("sendInitialEvents") == "true":
                events.append(self._bookmark(kind, initial_end=True))
        elif not since.isdigit():
            raise _Refusal(400, "BadRequest", f"invalid resourceVersion {since!r}")
        elif int(since) < self._log_floor[kind.key]:
            gone = _Refusal(410, "Expired", f"too old resource version: {since}").response()
            events = [{"type": "ERROR", "object": json.loads(gone.text or "{}")}]
        else:
            events = [
                e for rv, e in self._log[kind.key] if rv > int(since) and watcher.wants(e["object"])
            ]
        wid = id(watcher)
        self._watches[wid] = watcher
        self._watchers[kind.key].add(wid)  # registered with the snapshot: no await in between
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)
            for event in events:
                await response.write(json.dumps(event).encode() + b"\n")
            if events and events[-1]["type"] == "ERROR":
                return response
            timeout = float(params.get("timeoutSeconds") or 0)
            deadline = time.monotonic() + timeout if timeout else None
            bookmarks = params.get("allowWatchBookmarks") == "true"
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                wait = min(x for x in (left, self.bookmark_interval) if x is not None)
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and (left is None or left > wait):
                        await response.write(json.dumps(self._bookmark(kind)).encode() + b"\n")
                    continue
                if item is None:  # the server is closing
                    break
                await response.write(json.dumps(item).encode() + b"\n")
            await response.write_eof()
            return response
        except ConnectionError:  # the client went away
            return response
        finally:
            self._watchers[kind.key].discard(wid)
            self._watches.pop(wid, None)

    def _bookmark(self, kind: Kind, initial_end: bool = False) -> Obj:
        meta: Obj = {"resourceVersion": str(self._rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta},
        }

    def close_watches(self) -> None:
        """End every open watch stream (before the server stops)."""
        for watcher in self._watches.values():
            watcher.queue.put_nowait(None)


def _check_rv(new: Obj, old: Obj) -> None:
    wanted = (new.get("metadata") or {}).get("resourceVersion")
    if wanted and wanted != old["metadata"]["resourceVersion"]:
        raise _conflict(None, old["metadata"]["name"])


def _conflict(kind: Kind | None, name: str) -> _Refusal:
    return _Refusal(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
    )


# --- the synchronous side: a thread running the server, and a client for the tests ----------


class ApiError(Exception):
    """A non-2xx answer from the API server; `status` is its Kubernetes Status body."""

    def __init__(self, code: int, status: Obj) -> None:
        super().__init__(f"{code} {status.get('reason')}: {status.get('message')}")
        self.code = code
        self.status = status
        self.reason: str = status.get("reason", "")
        self.message: str = status.get("message", "")


class KubeApi:
    """Runs an `ApiServer` in a thread; a synchronous HTTP client for plain tests."""

    Error = ApiError

    def __init__(self, factory: Callable[[], ApiServer] = ApiServer) -> None:
        self._factory = factory
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kube-api-server", daemon=True)
        self.server: ApiServer
        self.port = 0
        self.url = ""
        self._http = urllib3.PoolManager(headers={"User-Agent": HARNESS_AGENT}, retries=False)

    # --- lifecycle ---

    def start(self) -> KubeApi:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the API server did not start in 30 s")
        if self._error is not None:
            raise RuntimeError("the API server did not start") from self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = self._factory()
        async with self.server, kmock.Server(self.server, user_agent="") as http:
            self.port = http.port
            self.url = f"http://127.0.0.1:{self.port}"
            self._ready.set()
            await self._stop.wait()
            self.server.close_watches()
            await asyncio.sleep(0.05)  # let the streams end before the port closes

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._http.clear()

    def inject(self, obj: Obj) -> None:
        """Store ``obj`` with no admission at all (no schema, no CEL), as an object written
        under an older CRD, or straight into etcd, would be."""
        assert self._loop is not None
        done = concurrent.futures.Future[None]()

        def put() -> None:
            try:
                self.server.put_object(obj)
                done.set_result(None)
            except BaseException as exc:
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(put)
        done.result(timeout=10)

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig (no TLS, a dummy token) that kubectl and kopf accept."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "dummy"}}],
            "contexts": [
                {
                    "name": "kmock",
                    "context": {"cluster": "kmock", "user": "tester", "namespace": "default"},
                }
            ],
            "current-context": "kmock",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # --- introspection ---

    @property
    def requests(self) -> collections.Counter[str]:
        """Requests per verb (get, list, watch, create, update, patch, delete), harness excluded."""
        return collections.Counter(self.server.verbs)

    @property
    def request_details(self) -> collections.Counter[str]:
        """Requests per "verb plural[/status]", harness excluded."""
        return collections.Counter(self.server.details)

    def reset_requests(self) -> None:
        self.server.verbs.clear()
        self.server.details.clear()

    @property
    def statuses(self) -> list[StatusWrite]:
        return list(self.server.statuses)

    @property
    def rejections(self) -> list[Obj]:
        return list(self.server.rejections)

    # --- HTTP ---

    def kind(self, plural: str) -> Kind:
        """The Kind for "vmdisks", "vmd", "VMDisk" or "group/version/plural"."""
        for kind in self.server.kinds.values():
            names = {kind.plural, kind.kind, *kind.short_names, "/".join(kind.key).lstrip("/")}
            if plural in names:
                return kind
        raise KeyError(plural)

    def path(
        self,
        plural: str,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        kind = self.kind(plural)
        root = f"/apis/{kind.group}/{kind.version}" if kind.group else f"/api/{kind.version}"
        ns = f"/namespaces/{namespace}" if kind.namespaced and namespace else ""
        tail = "".join(f"/{p}" for p in (name, subresource) if p)
        return f"{root}{ns}/{kind.plural}{tail}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        fields: Mapping[str, str] | None = None,
    ) -> Obj:
        """Send one request; return the JSON answer or raise ApiError."""
        data = None if body is None else json.dumps(body).encode()
        resp = self._http.request(
            method,
            self.url + path,
            body=data,
            fields=fields,
            headers={"Content-Type": content_type, "User-Agent": HARNESS_AGENT},
        )
        answer: Obj = json.loads(resp.data or b"{}")
        if resp.status >= 400:
            raise ApiError(resp.status, answer)
        return answer

    def create(self, obj: Obj) -> Obj:
        kind = self.server._kind_of(obj)
        ns = (obj.get("metadata") or {}).get("namespace") or "default"
        return self.request("POST", self.path(kind.plural, ns), obj)

    def get(self, plural: str, namespace: str | None, name: str) -> Obj | None:
        """The object, or None if it does not exist."""
        try:
            return self.request("GET", self.path(plural, namespace, name))
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def list(
        self,
        plural: str,
        namespace: str | None = None,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[Obj]:
        fields = {
            k: v
            for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector))
            if v
        }
        items: list[Obj] = self.request("GET", self.path(plural, namespace), fields=fields)["items"]
        return items

    def patch(
        self,
        plural: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> Obj:
        """Patch with patch_type "merge" (RFC 7386) or "json" (RFC 6902)."""
        ctype = {"merge": "application/merge-patch+json", "json": "application/json-patch+json"}
        path = self.path(plural, namespace, name, subresource)
        return self.request("PATCH", path, patch, content_type=ctype[patch_type])

    def replace(self, obj: Obj, *, subresource: str | None = None) -> Obj:
        kind, meta = self.server._kind_of(obj), obj["metadata"]
        path = self.path(kind.plural, meta.get("namespace"), meta["name"], subresource)
        return self.request("PUT", path, obj)

    def delete(self, plural: str, namespace: str | None, name: str) -> Obj | None:
        """Delete; the object as returned (with deletionTimestamp if finalizers hold it)."""
        try:
            return self.request("DELETE", self.path(plural, namespace, name))
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def wait_for(
        self,
        plural: str,
        namespace: str | None,
        name: str,
        predicate: Callable[[Obj | None], bool],
        timeout: float = 10.0,
    ) -> Obj | None:
        """Poll until predicate(object or None) holds; return that object."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.get(plural, namespace, name)
            if predicate(obj):
                return obj
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s; last seen: {obj!r}")
            time.sleep(0.05)

    def watch(
        self,
        plural: str,
        namespace: str | None = None,
        *,
        timeout: float = 5.0,
        stop: Callable[[builtins.list[Obj]], bool] = lambda events: False,
        **params: str,
    ) -> builtins.list[Obj]:
        """Collect watch events until stop(events) holds or `timeout` s pass."""
        fields = {"watch": "true", "timeoutSeconds": str(max(1, int(timeout))), **params}
        resp = self._http.request(
            "GET",
            self.url + self.path(plural, namespace),
            fields=fields,
            preload_content=False,
            timeout=urllib3.Timeout(connect=5, read=timeout + 5),
        )
        events: builtins.list[Obj] = []
        try:
            buffer = b""
            for chunk in resp.stream(1024, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    events.append(json.loads(line))
                    if stop(events):
                        return events
        finally:
            resp.release_conn()
            resp.close()
        return events


@contextlib.contextmanager
def running_api_server(factory: Callable[[], ApiServer] = ApiServer) -> Iterator[KubeApi]:
    """Start an API server in a thread for the duration of the block."""
    api = KubeApi(factory).start()
    try:
        yield api
    finally:
        api.stop()
    assert not api.server.failures, "the API server failed:\n" + "\n".join(api.server.failures)


@pytest.fixture
def api_server() -> Iterator[KubeApi]:
    """A fresh API server per test (state and request counters never leak between tests)."""
    with running_api_server() as api:
        yield api


@pytest.fixture
def kubeconfig(api_server: KubeApi, tmp_path: Path) -> Path:
    """A kubeconfig file pointing at ``api_server``."""
    return api_server.write_kubeconfig(tmp_path / "kubeconfig")
