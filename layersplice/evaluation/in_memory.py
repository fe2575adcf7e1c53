"""Splices as live transformers models, without writing a file.

The teacher's and the student's tensors are read once; the model of any plan
is then assembled from references to them, so every size of a family costs
no more memory than the two source models (plus one size's activations).

A search scores hundreds of plans, and building a transformers model costs
more than running a small one (43 of 47 ms per plan on a 36-layer test pair),
so `LoadedPair.model(plan, shared=True)` builds one model per spliced config
and gives each plan a copy of it that shares the decoder layers already made
for the same config, position and source tensors: only the layers new to it,
its embeddings, norm and head are made for it.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Iterator

import torch
from safetensors import safe_open

from layersplice.checkpoint.safetensors_format import FLOAT_DTYPES
from layersplice.checkpoint.torch_dtypes import TORCH_DTYPES
from layersplice.errors import ArchitectureError, LayerspliceError
from layersplice.planning.configs import spliced_config, transformers_config
from layersplice.planning.job import Job
from layersplice.planning.plan import Plan, make_plan, pruned_teacher_plan


def pick_device(name: str) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LayerspliceError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
    return torch.device(name)


def compute_dtype(job: Job, device: torch.device) -> torch.dtype:
    """--dtype if given; else the stored dtype on a GPU and fp32 on a CPU (CPU half precision is slow)."""
    if job.cast:
        return TORCH_DTYPES[job.cast]
    if device.type == "cpu":
        return torch.float32
    stored = {t.dtype for t in job.teacher.tensors.values()} & FLOAT_DTYPES
    return TORCH_DTYPES[stored.pop()] if len(stored) == 1 else torch.float32


class LoadedPair:
    """Teacher and student tensors, each read at most once, and the models made from them."""

    def __init__(self, job: Job, device: torch.device, dtype: torch.dtype) -> None:
        self.job, self.device, self.dtype = job, device, dtype
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._shared: SharedLayers | None = None

    def tensors(self, model: str) -> dict[str, torch.Tensor]:
        if model not in self._tensors:
            self._tensors[model] = self._read(model)
        return self._tensors[model]

    def _read(self, model: str) -> dict[str, torch.Tensor]:
        tensors = {}
        for path in self.job.checkpoint(model).files:
            with safe_open(str(path), framework="pt", device=str(self.device)) as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    tensors[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        return tensors

    def splice(self, patched: frozenset[int]):
        """The distilled splice with these blocks patched (what `build` would write)."""
        return self.model(make_plan(self.job.pair, patched, self.job.cast))

    def naive(self, patched: frozenset[int]):
        """The same layer selection taken from the teacher alone: no distillation (METHOD.md §1)."""
        pair = self.job.pair
        return self.model(pruned_teacher_plan(pair.teacher, pair.alignment, patched, self.job.cast))

    def model(self, plan: Plan, shared: bool = False):
        """The plan's model. With `shared`, its decoder layers may be modules that other plans' models of this
        pair hold too (SharedLayers): run such models for inference only, one at a time, and change none of them."""
        config, _ = spliced_config(self.job.layouts, plan, self.job.configs, self.job.cast)
        state = {t.name: self.tensors(t.model)[t.source.name] for t in plan.tensors}
        if not shared:
            return model_from_state(config, state, self.device)
        if self._shared is None:
            self._shared = SharedLayers(self.device)
        return self._shared.model(config, state, self.job.pair.layout(plan.embeddings_from).prefix)


def model_from_state(config: dict, state: dict[str, torch.Tensor], device: torch.device):
    """A model of `config` whose parameters are the tensors of `state` themselves, in eval mode."""
    model = _skeleton(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _check_set(model)
    return model.to(device).eval().requires_grad_(False)


def _skeleton(config: dict):
    """A transformers model of `config` with its parameters on the meta device and its buffers made."""
    from transformers import AutoModelForCausalLM

    config_object = transformers_config(config)
    if config_object is None:
        raise ArchitectureError(
            f"transformers cannot build model_type {config.get('model_type')!r}; evaluating in memory "
            "needs a model family transformers knows (or evaluate a `build --all` directory with --models)"
        )
    with _parameters_on_meta(), _no_weight_init():
        return AutoModelForCausalLM.from_config(config_object)


def _check_set(model) -> None:
    unset = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if unset:
        raise ArchitectureError(f"the plan leaves {len(unset)} parameters of the model unset, e.g. {unset[0]!r}")


class SharedLayers:
    """Models of many plans of one pair, built once per config, sharing decoder layers where they are the same.

    A decoder layer's module depends on the config, its position and its
    tensors (and on nothing else: transformers builds it from the config and
    its index), so two plans whose spliced configs are equal and that put the
    same source tensors at position i can hold one module there. Every other
    module of a plan's model is its own shallow copy of the config's skeleton,
    holding the plan's tensors; the tensors themselves are never copied."""

    # Skeletons (and their layers) kept, the most recently used: about 0.5 MB of modules per 16 layers each. Most
    # families have one config per size; those whose per-layer lists follow the source layers (layer_types) can
    # have one per set of blocks, and a search scores thousands.
    KEPT = 64

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._skeletons: OrderedDict[str, tuple[torch.nn.Module, dict]] = OrderedDict()
        self._layers: dict[str, dict[tuple, torch.nn.Module]] = {}

    def model(self, config: dict, state: dict[str, torch.Tensor], prefix: str):
        key = json.dumps(config, sort_keys=True)
        if key not in self._skeletons:
            self._skeletons[key] = self._made(config, prefix)
            self._layers[key] = {}
            if len(self._skeletons) > self.KEPT:
                dropped, _ = self._skeletons.popitem(last=False)
                del self._layers[dropped]
        self._skeletons.move_to_end(key)
        skeleton, layer_tensors = self._skeletons[key]
        model = self._copy(skeleton, "", state, self._layers[key], layer_tensors)
        model.tie_weights()
        _check_set(model)
        return model

    def _made(self, config: dict, prefix: str) -> tuple[torch.nn.Module, dict[str, tuple[tuple[str, ...], frozenset]]]:
        """The config's skeleton on the device, in eval mode, and for each of its decoder layers the names of its
        tensors and of its parameters among them."""
        skeleton = _skeleton(config).eval()
        for module in skeleton.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)
        names = {}
        for index, layer in enumerate(skeleton.get_submodule(prefix)):
            path = f"{prefix}.{index}"
            parameters = tuple(name for name, _ in layer.named_parameters(path))
            names[path] = (parameters + tuple(name for name, _ in layer.named_buffers(path)), frozenset(parameters))
        return skeleton, names

    def _copy(self, module, path: str, state, layers: dict, layer_tensors: dict):
        """The module for `path` holding `state`'s tensors: a shared decoder layer of this config (`layers`), or a
        new shallow copy."""
        shared = None
        if path in layer_tensors:
            names, parameters = layer_tensors[path]
            if all(name in state for name in parameters):  # a layer left unset is not shared: _check_set refuses it
                shared = (path, tuple(id(state.get(name)) for name in names))
                if shared in layers:
                    return layers[shared]
        copy = module.__class__.__new__(module.__class__)
        copy.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()})
        def full(name: str) -> str:
            return f"{path}.{name}" if path else name

        for name in module._parameters:
            if full(name) in state:
                copy._parameters[name] = torch.nn.Parameter(state[full(name)], requires_grad=False)
        for name in module._buffers:
            if full(name) in state:
                copy._buffers[name] = state[full(name)]
        for name, child in module._modules.items():
            if child is not None:
                copy._modules[name] = self._copy(child, full(name), state, layers, layer_tensors)
        if shared is not None:
            layers[shared] = copy
        return copy


def _no_weight_init():
    """Skip drawing initial weights: every parameter is replaced by a source tensor, and drawing them on
    the meta device took most of the time of assembling a small model (0.3 of 0.5 s on the fixture pair)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters take no memory but whose buffers (rotary tables) are real.

    Buffers are computed from the config at construction and are not in the
    checkpoint, so they must be made for real; parameters are replaced by
    the source tensors right after.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register
