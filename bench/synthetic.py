"""Llama-shaped safetensors checkpoints for the benches, written one shard at a time.

Each layer is its own shard (plus one for the embeddings and one for the
norm and head) with a model.safetensors.index.json, so no process ever holds a
whole model. Weights are random normals (std 0.02) in F32 or BF16; with
`sparse=True` the shards get real headers but their data is a hole made by
truncate, for benches that only read headers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layersplice.checkpoint.safetensors_format import DTYPE_SIZES, encode_header
from layersplice.planning.alignment import Alignment, copied_from_rule

INDEX_NAME = "model.safetensors.index.json"
FORMAT = {"format": "pt"}
TENSOR_CHUNK = 1 << 22  # elements drawn at a time, so memory stays small


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": {"BF16": "bfloat16", "F32": "float32"}[dtype],
        }

    def layer(self, index: int) -> dict[str, tuple[int, ...]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        shapes = {
            "input_layernorm.weight": (h,),
            "mlp.down_proj.weight": (h, i),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "post_attention_layernorm.weight": (h,),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, h),
            "self_attn.q_proj.weight": (h, h),
            "self_attn.v_proj.weight": (kv, h),
        }
        return {f"model.layers.{index}.{name}": shape for name, shape in shapes.items()}

    def shards(self, layers_per_shard: int = 1) -> list[dict[str, tuple[int, ...]]]:
        """Embeddings, the layers `layers_per_shard` to a shard, then norm and head."""
        groups = [range(i, min(i + layers_per_shard, self.layers)) for i in range(0, self.layers, layers_per_shard)]
        return [
            {"model.embed_tokens.weight": (self.vocab, self.hidden)},
            *({k: v for i in group for k, v in self.layer(i).items()} for group in groups),
            {"lm_head.weight": (self.vocab, self.hidden), "model.norm.weight": (self.hidden,)},
        ]


def write_checkpoint(
    directory: Path, shape: LlamaShape, dtype: str, seed: int, sparse: bool = False, layers_per_shard: int = 1
) -> int:
    """config.json, the shards and the index; returns the tensor bytes written."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
    rng = np.random.default_rng(seed)
    shards = shape.shards(layers_per_shard)
    weight_map, total = {}, 0
    for number, tensors in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(directory / name, tensors, dtype, rng, sparse)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return total


def _write_shard(path: Path, tensors: dict[str, tuple[int, ...]], dtype: str, rng: np.random.Generator, sparse: bool) -> int:
    entries = [(name, dtype, shape, int(np.prod(shape)) * DTYPE_SIZES[dtype]) for name, shape in sorted(tensors.items())]
    header = encode_header(entries, FORMAT)
    data = sum(nbytes for *_, nbytes in entries)
    with open(path, "wb") as fh:
        fh.write(header)
        if sparse:
            fh.truncate(len(header) + data)
            return data
        for _, _, shape, _ in entries:
            left = int(np.prod(shape))
            while left:
                count = min(left, TENSOR_CHUNK)
                fh.write(_random(rng, count, dtype))
                left -= count
    return data


def _random(rng: np.random.Generator, count: int, dtype: str) -> bytes:
    values = rng.standard_normal(count, dtype=np.float32) * np.float32(0.02)
    if dtype == "F32":
        return values.tobytes()
    return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # BF16 by truncation


def reference_alignment(teacher_layers: int) -> Alignment:
    """The reference's default student: first=1 every=2 last=2 (METHOD.md §2)."""
    return Alignment(copied_from_rule(teacher_layers, 1, 2, 2), teacher_layers)


def write_pair(root: Path, shape: LlamaShape, dtype: str, sparse: bool = False, layers_per_shard: int = 1) -> tuple[Path, Path]:
    """A teacher and its reference-layout student (with student_config.json) under root."""
    teacher, student = root / "teacher", root / "student"
    alignment = reference_alignment(shape.layers)
    write_checkpoint(teacher, shape, dtype, 0, sparse, layers_per_shard)
    student_shape = LlamaShape(**{**shape.__dict__, "layers": alignment.n_student})
    write_checkpoint(student, student_shape, dtype, 1, sparse, layers_per_shard)
    (student / "student_config.json").write_text(json.dumps(alignment.student_config()) + "\n")
    return teacher, student


def file_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def read_through(directory: Path) -> None:
    """Pull every file into the page cache."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                while os.read(fd, 8 << 20):
                    pass
            finally:
                os.close(fd)


def evict(directory: Path) -> None:
    """Drop every file's pages from the page cache (after writing them back)."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm_free_memory(nbytes: int) -> None:
    """Touch `nbytes` of fresh memory and free it, right before a timed command.

    These VMs report free memory to the host (page_reporting), which takes it
    back; the next command to allocate those pages then waits for the host to
    fault them in again, by chance and by up to seconds. Freed just before,
    they are still backed, so every command, cp or build, starts alike.
    (A bytes object, not numpy: numpy asks for huge pages, which then split.)
    """
    touched = b"\x01" * nbytes
    del touched
