"""The distilled student as a transformers directory, gathered one tensor at a time.

Every process walks the same list of tensors; each sharded tensor is
gathered whole (DTensor.full_tensor, a collective), cast to the student's
stored dtype and, on rank 0, appended to the safetensors file it belongs to,
then released. No process ever holds more than one whole tensor of the
model, and the optimizer state is never gathered. The files are those
save_pretrained writes: config.json, generation_config.json, and shards of
at most its default 50 GB, cut, ordered and indexed as it does, under the
names it saves (any renaming transformers applies at load, such as GPT-NeoX's
embed_out, is reverted tensor by tensor with its own revert_weight_conversion).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from layersplice.checkpoint.safetensors_format import encode_header
from layersplice.checkpoint.source import SIDE_FILES
from layersplice.checkpoint.torch_dtypes import TORCH_DTYPES
from layersplice.checkpoint.writer import FORMAT_METADATA
from layersplice.distill.config import DistillConfig
from layersplice.distill.parallel import World
from layersplice.planning.alignment import STUDENT_CONFIG_NAME

MAX_SHARD_SIZE = "50GB"  # save_pretrained's default
_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class _Entry:
    name: str  # as written
    source: str  # the live model's state-dict name it is computed from
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter (a tied head): state dicts hold
    them as separate entries, which transformers would write twice."""
    seen: set[int] = set()
    aliases = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            aliases.add(name)
        seen.add(id(parameter))
    return aliases


def _saved_names(shell: torch.nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """What save_pretrained writes for one live tensor: itself, renamed, or split (transformers' reverse
    of the conversions it applies at load)."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(shell, {name: tensor}))


def _plan(shell: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> list[_Entry]:
    """What to write, in save_pretrained's order, from meta stand-ins of the live tensors (no data is touched)."""
    from transformers.core_model_loading import revert_weight_conversion

    stand_ins = {name: torch.empty(tensor.shape, dtype=dtype, device="meta") for name, tensor in state.items()}
    source_of = {saved: name for name in state for saved in _saved_names(shell, name, stand_ins[name])}
    return [_Entry(saved, source_of[saved], tuple(tensor.shape), dtype)
            for saved, tensor in revert_weight_conversion(shell, stand_ins).items()]


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def export_student(config: DistillConfig, student: torch.nn.Module, stored_dtype: torch.dtype, world: World) -> None:
    """Collective: write the student to config.out (rank 0 writes; every rank gathers)."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.student), dtype=stored_dtype)
    aliases = _tied_aliases(shell)
    state = {k: v for k, v in get_model_state_dict(student).items() if k not in aliases}
    entries = {entry.name: entry for entry in _plan(shell, state, stored_dtype)}
    # save_pretrained's own way of cutting shards, applied to sizes instead of tensors
    split = split_state_dict_into_shards_factory(
        entries, get_storage_size=lambda entry: entry.nbytes,
        filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=MAX_SHARD_SIZE,
    )
    for filename, names in split.filename_to_tensors.items():
        _write_shard(config.out / filename, [entries[n] for n in names], state, shell, stored_dtype, world)
    if not world.is_main:
        return
    if split.is_sharded:
        index = {"metadata": {"total_parameters": shell.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (config.out / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    shell.config.dtype = str(stored_dtype).removeprefix("torch.")
    shell.config.architectures = [type(shell).__name__]
    shell.config.save_pretrained(config.out)
    if shell.can_generate():
        shell.generation_config.save_pretrained(config.out)
    for name in (STUDENT_CONFIG_NAME, *SIDE_FILES):
        for home in (config.student, config.teacher):
            if (home / name).is_file():
                shutil.copyfile(home / name, config.out / name)
                break


def _write_shard(path: Path, shard: list[_Entry], state: dict, shell, dtype: torch.dtype, world: World) -> None:
    """Collective: gather each tensor of one shard in turn; rank 0 appends its bytes to `path`."""
    header = encode_header([(e.name, _DTYPE_NAMES[e.dtype], e.shape, e.nbytes) for e in shard], FORMAT_METADATA)
    with open(path, "wb") if world.is_main else contextlib.nullcontext() as handle:
        if handle is not None:
            handle.write(header)
        source, saved = None, {}
        for entry in shard:
            if entry.source != source:  # one live tensor may give several saved ones
                source = entry.source
                whole = _whole(state[source])  # a collective: every rank takes part
                if handle is not None:
                    saved = _saved_names(shell, source, whole.detach().to("cpu", dtype))
            if handle is not None:
                handle.write(saved[entry.name].contiguous().reshape(-1).view(torch.uint8).numpy().data)
