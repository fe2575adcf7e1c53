"""Human sizes: '5GB', '500MiB', '1.5B' parameters."""

from __future__ import annotations

import re

from layersplice.errors import LayerspliceError

_BYTE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _BYTE_UNITS:
        raise LayerspliceError(f"cannot read size {text!r}: use a number with a unit such as 5GB, 500MB or 2GiB")
    value = int(float(match.group(1)) * _BYTE_UNITS[unit])
    if value <= 0:
        raise LayerspliceError(f"size {text!r} must be positive")
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
