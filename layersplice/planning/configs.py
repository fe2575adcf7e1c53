"""config.json for a splice: layer count, every per-layer entry, and tying (METHOD.md §4-5)."""

from __future__ import annotations

import copy
import warnings

from layersplice.architectures.layout import Layout
from layersplice.errors import ArchitectureError
from layersplice.planning.plan import Plan

TORCH_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def per_layer_values(config: dict, key: str, n_layers: int) -> list | None:
    """A per-layer list as the model sees it, even where config.json leaves it implicit.

    Qwen2/3 derive layer_types from max_window_layers and Gemma 3 from
    sliding_window_pattern when the list is absent; transformers' own config
    class is the authority on that derivation.
    """
    value = config.get(key)
    if isinstance(value, list):
        return value if len(value) == n_layers else _wrong_length(key, len(value), n_layers)
    derived = getattr(transformers_config(config), key, None)
    if isinstance(derived, list) and len(derived) == n_layers:
        return list(derived)
    return None


def _wrong_length(key: str, got: int, n_layers: int) -> list:
    raise ArchitectureError(f"config.json: {key} has {got} entries but the model has {n_layers} layers")


def transformers_config(config: dict):
    """transformers' config object for a config.json dict, or None where transformers has none."""
    try:
        from transformers import AutoConfig

        data = {k: v for k, v in config.items() if k not in ("auto_map",)}
        model_type = data.pop("model_type", None)
        if model_type is None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.for_model(model_type, **data)
    except (ImportError, ValueError, KeyError, TypeError):
        return None


def spliced_config(layouts: dict[str, Layout], plan: Plan, configs: dict[str, dict], cast: str | None) -> tuple[dict, dict[str, str]]:
    """The output config and the per-layer keys rewritten (key -> how).

    `layouts` and `configs` are keyed by model ("teacher", "student"); each
    output layer takes its per-layer entries from the layer it came from.
    """
    base = copy.deepcopy(configs[plan.embeddings_from])
    layout = layouts[plan.embeddings_from]
    n_out = plan.n_layers
    base[layout.num_layers_key] = n_out
    rewritten: dict[str, str] = {}
    for key in layout.per_layer_lists:
        sources = {m: per_layer_values(configs[m], key, layouts[m].n_layers) for m in layouts}
        if any(v is None for v in sources.values()):
            continue
        base[key] = [sources[layer.model][layer.source_layer] for layer in plan.layers]
        rewritten[key] = "per layer"
    for key in layout.per_layer_thresholds:
        value = _threshold(plan, configs, key)
        if value is not None:
            base[key] = value
            rewritten[key] = "threshold"
    periods = dict((listed, period) for period, listed in layout.per_layer_periods)
    for key in layout.per_layer_index_lists:
        indices = _index_list(plan, configs, key, periods.get(key))
        if indices is not None:
            base[key] = indices
            rewritten[key] = "layer indices"
            if key in periods:
                base[periods[key]] = 1
                rewritten[periods[key]] = f"1, exceptions in {key}"
    if not plan.tied:
        base["tie_word_embeddings"] = False
    if cast:
        # transformers 5 writes "dtype", older versions "torch_dtype".
        base["dtype" if "dtype" in base else "torch_dtype"] = TORCH_DTYPE_NAMES[cast]
    return base, rewritten


def _threshold(plan: Plan, configs: dict[str, dict], key: str) -> int | None:
    """Rewrite 'layers below index N are special' so each layer keeps its side of N.

    Where the kept layers no longer form a prefix, the explicit per-layer list
    (layer_types) carries the truth and N counts the leading run.
    """
    if not all(isinstance(configs[layer.model].get(key), int) for layer in plan.layers):
        return None
    below = [layer.source_layer < configs[layer.model][key] for layer in plan.layers]
    return next((i for i, b in enumerate(below) if not b), len(below))


def _index_list(plan: Plan, configs: dict[str, dict], key: str, period: str | None) -> list[int] | None:
    """Rewrite 'these layer indices are special' (Qwen-MoE mlp_only_layers) so each layer keeps its status.

    With a period key (layers with (i + 1) % k == 0 are the regular ones), the
    source layers off that period are listed too, and the period becomes 1.
    """
    if not any(key in c or (period and period in c) for c in configs.values()):
        return None

    def listed(layer) -> bool:
        config = configs[layer.model]
        off_period = period is not None and (layer.source_layer + 1) % (config.get(period) or 1) != 0
        return layer.source_layer in (config.get(key) or []) or off_period

    return [layer.index for layer in plan.layers if listed(layer)]
