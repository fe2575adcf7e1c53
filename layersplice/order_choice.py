"""How the patch order was chosen: last or first, an order recorded in a file,
or KL on calibration text (--order kl, which alone needs torch)."""

from __future__ import annotations

import json
from pathlib import Path

from layersplice.blocks import Order, patch_order
from layersplice.errors import LayerspliceError
from layersplice.job import Job


def resolve_order(job: Job, order: str, order_file: Path | None, calib: Path | None, on_step=None) -> tuple[Order, dict]:
    """(order for the block functions, its record for layersplice.json)."""
    if order_file is not None:
        blocks = read_order_file(order_file)
        patch_order(job.pair.alignment, blocks)  # checks it names every block once
        return blocks, {"order": "file", "patch_order": list(blocks), "order_file": str(order_file)}
    if order != "kl":
        if calib is not None:
            raise LayerspliceError("--calib is the calibration text of --order kl; add --order kl or drop --calib")
        return order, {"order": order}
    if calib is None:
        raise LayerspliceError("--order kl measures KL on calibration text: add --calib FILE (.txt, .jsonl or .parquet)")
    from layersplice.kl_order import kl_order_for

    chosen = kl_order_for(job, calib, on_step)
    return chosen.blocks, chosen.record()


def read_order_file(path: Path) -> tuple[int, ...]:
    """'patch_order' from a layersplice.json (or any JSON object holding one at the top or in 'choice')."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayerspliceError(f"--order-file {path}: cannot read JSON ({exc})") from None
    found = data.get("patch_order", (data.get("choice") or {}).get("patch_order")) if isinstance(data, dict) else None
    if not isinstance(found, list) or not all(isinstance(b, int) for b in found):
        raise LayerspliceError(
            f"--order-file {path}: no 'patch_order' list of block numbers; give the layersplice.json "
            "of a model built with --order kl"
        )
    return tuple(found)
