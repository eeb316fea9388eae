"""Kubernetes resource quantities (``10Gi``, ``512Mi``, ``1G``) as exact byte counts."""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

_SUFFIXES: dict[str, int] = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_QUANTITY = re.compile(
    r"^(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)|[eE](?P<exp>[+-]?[0-9]+))?$"
)
QUANTITY_PATTERN = _QUANTITY.pattern


@lru_cache(maxsize=1024, typed=True)  # typed: True must not hit 1's entry
def parse_bytes(value: str | int) -> int:
    """Return the exact number of bytes a quantity denotes.

    Raises ValueError for malformed quantities, negative values and
    quantities that are not a whole number of bytes (``0.5``, ``100m``).
    """
    if isinstance(value, bool):
        raise ValueError("a size must be a quantity such as 10Gi, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _QUANTITY.match(value.strip())
    if match is None:
        raise ValueError(
            f"invalid quantity {value!r}: use a number with an optional suffix "
            "(Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E), e.g. 10Gi"
        )
    digits, exp = match.group("num"), match.group("exp")
    if exp is None and digits.isdigit():  # the common case, in integers (Fraction is slow)
        return int(digits) * _SUFFIXES[match.group("suffix") or ""]
    number = Fraction(digits)
    if exp is not None:
        exponent = int(exp)
        if abs(exponent) > 30:
            raise ValueError(f"quantity {value!r} is out of range")
        number *= Fraction(10) ** exponent
    else:
        number *= _SUFFIXES[match.group("suffix") or ""]
    if number.denominator != 1:
        raise ValueError(f"quantity {value!r} is not a whole number of bytes")
    return int(number)


def format_bytes(size: int) -> str:
    """Render bytes as the shortest exact binary quantity (``10Gi``)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _SUFFIXES[suffix]
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
