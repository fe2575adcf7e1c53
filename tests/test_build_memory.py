"""`layersplice build` streams: its memory does not grow with the checkpoint.

A Llama-shaped teacher of ~680 MB and its ~430 MB student are written one
shard at a time (this process never holds either), then a fresh interpreter
runs the build and reports its child's peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from safetensors_files import INDEX_NAME, TensorLocation, tensor_locations
from transformers import LlamaConfig

PEAK_RSS_LIMIT_MIB = 200
BUILD_TIMEOUT_S = 600  # stops a hang; never a speed target (those are in bench/)
N_TEACHER = 12
# first/every/last 1/2/2 on 12 layers: blocks [0,2), ..., [8,10), then 10 and 11.
COPIED = (0, 2, 4, 6, 8, 10, 11)
N_KEEP = 3  # order last: student layers 0-2, then teacher layers 6-11
REPO_ROOT = Path(__file__).resolve().parent.parent

CONFIG = LlamaConfig(
    vocab_size=8192,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=N_TEACHER,
    num_attention_heads=16,
    num_key_value_heads=16,
    tie_word_embeddings=False,
)

# A fresh interpreter whose only child is the build, so RUSAGE_CHILDREN is the build's.
MEASURE = """
import json, resource, subprocess, sys
done = subprocess.run([sys.executable, "-m", "layersplice", *sys.argv[2:]],
                      capture_output=True, text=True, timeout=float(sys.argv[1]))
print(json.dumps({"returncode": done.returncode, "output": (done.stdout + done.stderr)[-4000:],
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, i = config.hidden_size, config.intermediate_size
    return {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }


def _write_sharded(directory: Path, n_layers: int, seed: int) -> None:
    """config.json, one shard for the embeddings, one per layer, one for the head, and the index."""
    directory.mkdir()
    config = LlamaConfig(**{**CONFIG.to_dict(), "num_hidden_layers": n_layers})
    config.save_pretrained(directory)
    h, vocab = CONFIG.hidden_size, CONFIG.vocab_size
    shards = [{"model.embed_tokens.weight": (vocab, h)}]
    shards += [
        {f"model.layers.{layer}.{name}": shape for name, shape in _layer_shapes(CONFIG).items()}
        for layer in range(n_layers)
    ]
    shards.append({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})

    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for number, shapes in enumerate(shards):
        file_name = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        save_file(tensors, directory / file_name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("big")
    teacher, student = root / "teacher", root / "student"
    _write_sharded(teacher, N_TEACHER, seed=0)
    _write_sharded(student, len(COPIED), seed=1)
    pruned = [i for i in range(N_TEACHER) if i not in COPIED]
    (student / "student_config.json").write_text(
        json.dumps({"pruned_teacher_layers": pruned, "copied_teacher_layers": list(COPIED)})
    )
    return teacher, student


def _expected_sources(teacher: Path, student: Path) -> dict[str, tuple[Path, str]]:
    """Output tensor -> (checkpoint, tensor) for --keep N_KEEP --order last."""
    teacher_layers = range(COPIED[N_KEEP], N_TEACHER)
    sources = [(student, layer) for layer in range(N_KEEP)] + [(teacher, layer) for layer in teacher_layers]
    expected = {"model.embed_tokens.weight": (student, "model.embed_tokens.weight")}
    for out_layer, (directory, layer) in enumerate(sources):
        for name in _layer_shapes(CONFIG):
            expected[f"model.layers.{out_layer}.{name}"] = (directory, f"model.layers.{layer}.{name}")
    expected["model.norm.weight"] = (teacher, "model.norm.weight")
    expected["lm_head.weight"] = (teacher, "lm_head.weight")
    return expected


def _same_bytes(a: TensorLocation, b: TensorLocation, chunk: int = 8 << 20) -> bool:
    if (a.dtype, a.shape, a.end - a.start) != (b.dtype, b.shape, b.end - b.start):
        return False
    with a.path.open("rb") as fa, b.path.open("rb") as fb:
        fa.seek(a.start)
        fb.seek(b.start)
        for offset in range(0, a.end - a.start, chunk):
            size = min(chunk, a.end - a.start - offset)
            if fa.read(size) != fb.read(size):
                return False
    return True


def peak_rss_mib(args: list[str], timeout_s: float) -> float:
    """Run `layersplice ARGS` as the only child of a fresh interpreter; its peak RSS (fails the test if it fails)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(timeout_s), *args],
        capture_output=True, text=True, env=env, timeout=timeout_s + 10, check=True,
    )
    report = json.loads(done.stdout)
    assert report["returncode"] == 0, report["output"]
    return report["peak_rss_kib"] / 1024


@pytest.mark.slow
def test_build_of_a_large_checkpoint_stays_under_the_memory_bound(big_pair, tmp_path):
    teacher, student = big_pair
    source_bytes = sum(p.stat().st_size for d in big_pair for p in d.glob("*.safetensors"))
    assert source_bytes > 5 * PEAK_RSS_LIMIT_MIB * 2**20

    out = tmp_path / "out"
    args = ["build", "--teacher", str(teacher), "--student", str(student), "--out", str(out),
            "--keep", str(N_KEEP), "--order", "last"]
    peak_mib = peak_rss_mib(args, BUILD_TIMEOUT_S)
    assert peak_mib < PEAK_RSS_LIMIT_MIB, f"peak RSS {peak_mib:.0f} MiB"

    written = tensor_locations(out)
    expected = _expected_sources(teacher, student)
    assert set(written) == set(expected)
    locations = {d: tensor_locations(d) for d in big_pair}
    wrong = [name for name, (d, source) in expected.items() if not _same_bytes(written[name], locations[d][source])]
    assert wrong == []
