"""Human sizes: '5GB', '500MiB', '1.5B' parameters."""

from __future__ import annotations

import re

from layersplice.errors import LayerspliceError

_BYTE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


_PARAM_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_bytes(text: str) -> int:
    return _parse_scaled(text, _BYTE_UNITS, "size", "5GB, 500MB or 2GiB")


def parse_params(text: str) -> int:
    """A parameter count such as '1.5B', '350M' or '120000'."""
    return _parse_scaled(text, _PARAM_UNITS, "parameter count", "1.5B, 350M or 20K")


def _parse_scaled(text: str, units: dict[str, int], what: str, examples: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in units:
        raise LayerspliceError(f"cannot read {what} {text!r}: use a number with a unit such as {examples}")
    value = int(float(match.group(1)) * units[unit])
    if value <= 0:
        raise LayerspliceError(f"{what} {text!r} must be positive")
    return value


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_params(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
