"""Validation errors as ``field.path: message`` lines a person can act on."""

from __future__ import annotations

from pydantic import ValidationError


def describe_errors(exc: ValidationError) -> list[str]:
    """``field.path: message`` for every error pydantic found."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"]) or "(object)"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}")
    return lines
