"""`layersplice transfer` streams: its memory stays under build's bound.

The ~680 MB base teacher and ~430 MB student of the build memory test, and a
~680 MB variant with other random weights, are written one shard at a time;
a fresh interpreter runs the transfer and reports its child's peak RSS.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors_files import tensor_locations
from test_build_memory import COPIED, N_TEACHER, PEAK_RSS_LIMIT_MIB, _write_sharded, big_pair, peak_rss_mib  # noqa: F401

TRANSFER_TIMEOUT_S = 600  # stops a hang; never a speed target (those are in bench/)
CHECKED_TENSORS = ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "lm_head.weight")


@pytest.mark.slow
def test_transfer_of_a_large_checkpoint_stays_under_the_build_memory_bound(big_pair, tmp_path):  # noqa: F811
    base, student = big_pair
    variant = tmp_path / "variant"
    _write_sharded(variant, N_TEACHER, seed=2)
    source_bytes = sum(p.stat().st_size for d in (base, variant, student) for p in d.glob("*.safetensors"))
    assert source_bytes > 8 * PEAK_RSS_LIMIT_MIB * 2**20

    out = tmp_path / "out"
    args = ["transfer", "--base-teacher", str(base), "--teacher", str(variant), "--student", str(student),
            "--out", str(out)]
    peak_mib = peak_rss_mib(args, TRANSFER_TIMEOUT_S)
    assert peak_mib < PEAK_RSS_LIMIT_MIB, f"peak RSS {peak_mib:.0f} MiB"

    written = tensor_locations(out)
    assert sum(loc.end - loc.start for loc in written.values()) == sum(
        loc.end - loc.start for loc in tensor_locations(student).values())
    for name in CHECKED_TENSORS:  # a few tensors end to end, each read alone
        teacher_name = name.replace("layers.3.", f"layers.{COPIED[3]}.")
        v, s, b = (_read(d, n) for d, n in ((variant, teacher_name), (student, name), (base, teacher_name)))
        assert torch.equal(_read(out, name), torch.where(v == b, s, v + (s - b)))


def _read(directory, name: str) -> torch.Tensor:
    location = tensor_locations(directory)[name]
    with safe_open(location.path, "pt") as f:
        return f.get_tensor(name)
