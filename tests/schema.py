"""Validate objects the way the kube-apiserver would, against the generated CRDs.

No kube-apiserver can run here, so this stands in for it: schema defaults are
applied, the openAPIV3Schema is checked with `jsonschema` (which reads
``anyOf: [integer, string]`` of int-or-string fields natively and ignores the
``x-kubernetes-*`` keys), and every ``x-kubernetes-validations`` CEL rule is
evaluated with cel-python.  Transition rules (those naming ``oldSelf``) run only
when an old object is given and holds a value at the same place, as on an
update.  The Kubernetes quantity library is provided by `_QUANTITY_FUNCTIONS`,
on top of `vmdisk.api.quantity.parse_bytes`, for the subset of quantities our
pattern admits.
"""

from __future__ import annotations

import copy
import re
from fractions import Fraction
from functools import cache
from typing import Any

import celpy
import jsonschema
from celpy import celtypes
from celpy.adapter import json_to_cel

from vmdisk.api.crd import crds
from vmdisk.api.quantity import parse_bytes
from vmdisk.backends.registry import PLUGINS

Schema = dict[str, Any]


class CRDValidationError(ValueError):
    """The apiserver would refuse the object; `errors` holds one line per failure."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def crd_schema(kind: str) -> Schema:
    """The openAPIV3Schema of the CRD serving `kind`."""
    for crd in crds(PLUGINS):
        if crd["spec"]["names"]["kind"] == kind:
            schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(kind)


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Fill in schema defaults, as the apiserver does when it decodes a request."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


# --- the Kubernetes CEL quantity library, enough of it for our rules ------------


class _Quantity(Fraction):
    """A parsed quantity: an opaque CEL value that only our functions accept."""


def _quantity(text: celtypes.Value) -> _Quantity:
    return _Quantity(parse_bytes(str(text)))


def _is_quantity(text: celtypes.Value) -> celtypes.BoolType:
    try:
        parse_bytes(str(text))
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def _sign(q: _Quantity) -> celtypes.IntType:
    return celtypes.IntType((q > 0) - (q < 0))


def _compare_to(a: _Quantity, b: _Quantity) -> celtypes.IntType:
    return celtypes.IntType((a > b) - (a < b))


_QUANTITY_FUNCTIONS: dict[str, Any] = {
    "quantity": _quantity,
    "isQuantity": _is_quantity,
    "sign": _sign,
    "compareTo": _compare_to,
}


@cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule), functions=_QUANTITY_FUNCTIONS)


def _eval_rule(rule: str, value: Any, old: Any) -> bool:
    activation = {"self": json_to_cel(value)}
    if old is not None:
        activation["oldSelf"] = json_to_cel(old)
    result = _program(rule).evaluate(activation)
    if isinstance(result, Exception):
        raise result
    return bool(result)


_ABSENT = object()


def _check_rules(schema: Schema, value: Any, old: Any, path: str, errors: list[str]) -> None:
    for item in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in item["rule"]
        if transition and old is _ABSENT:
            continue
        if not _eval_rule(item["rule"], value, old if transition else None):
            where = (path + item.get("fieldPath", "")).lstrip(".")
            errors.append(f"{where}: Invalid value: {item['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                sub_old = old.get(name, _ABSENT) if isinstance(old, dict) else _ABSENT
                _check_rules(sub, value[name], sub_old, f"{path}.{name}", errors)
    elif isinstance(value, list) and "items" in schema:
        # Old list items are not correlated here: we have no rules under lists.
        for i, item in enumerate(value):
            _check_rules(schema["items"], item, _ABSENT, f"{path}[{i}]", errors)


def validate_against_crd(obj: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate `obj` (a create, or an update of `old`); return it defaulted.

    Raises CRDValidationError listing every schema and CEL failure.  On an
    update, errors at values that did not change are dropped, as the
    apiserver's validation ratcheting does (on by default since 1.30): an
    object stored under an older, looser CRD can still get its status written.
    """
    schema = crd_schema(obj["kind"])
    new = apply_defaults(schema, copy.deepcopy(obj))
    previous = _ABSENT if old is None else apply_defaults(schema, copy.deepcopy(old))
    errors = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in jsonschema.Draft202012Validator(schema).iter_errors(new)
    ]
    errors = [e for e in errors if not _unchanged(e, new, previous)]
    if not errors:
        _check_rules(schema, new, previous, "", errors)
        errors = [e for e in errors if not _unchanged(e, new, previous)]
    if errors:
        raise CRDValidationError(errors)
    result: dict[str, Any] = new
    return result


def _unchanged(error: str, new: Any, old: Any) -> bool:
    """Whether the value an error points at is the same in the old object (ratcheting)."""
    if old is _ABSENT:
        return False
    path = error.split(": ", 1)[0]
    if path == "<root>":
        return False
    for part in re.split(r"\.|\[(\d+)\]", path):
        if not part:
            continue
        key: Any = int(part) if part.isdigit() else part
        try:
            new, old = new[key], old[key]
        except (KeyError, IndexError, TypeError):
            return False
    return bool(new == old)
