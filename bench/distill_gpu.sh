#!/usr/bin/env bash
# GPU throughput and memory of `layersplice distill`: a random Llama-shaped
# teacher (~300M parameters, built from a config) and its 1/2/2 student
# (~190M), random-token batches (--synthetic-data: no tokenizer or dataset
# download), bf16 autocast, a few steps:
#   1. one plain process;
#   2. torchrun with NPROC processes, both models sharded by FSDP2 over NCCL
#      (NPROC=1 works: the FSDP2 path is taken whenever torchrun starts it).
# Prints the median tokens/s (first steps dropped as warm-up) and
# torch.cuda.max_memory_allocated of each. Needs no network.
#
#   bash bench/distill_gpu.sh                # NPROC = number of visible GPUs
#   NPROC=1 STEPS=20 bash bench/distill_gpu.sh
# Settings (environment): NPROC STEPS HIDDEN LAYERS VOCAB SEQ BATCH MICRO WORK PYTHON
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself; no install needed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

missing=$("$py" - <<'EOF'
import importlib.util
needed = ["torch", "transformers", "safetensors", "click", "rich", "pydantic", "yaml", "huggingface_hub", "numpy"]
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "distill_gpu.sh: this Python ($("$py" -c 'import sys; print(sys.executable)')) lacks: $missing" >&2
    echo "  layersplice needs them (see pyproject.toml); install them from a wheelhouse or a mirror, e.g." >&2
    echo "  pip install --no-index --find-links WHEELS transformers safetensors click rich pydantic pyyaml huggingface_hub numpy" >&2
    echo "  (do not let pip replace the installed CUDA torch)" >&2
    exit 1
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "distill_gpu.sh: torch sees no CUDA device" >&2
    exit 1
fi

nproc=${NPROC:-$("$py" -c 'import torch; print(torch.cuda.device_count())')}
steps=${STEPS:-20}
hidden=${HIDDEN:-1024}
layers=${LAYERS:-16}
vocab=${VOCAB:-32000}
seq=${SEQ:-2048}
batch=${BATCH:-16}
micro=${MICRO:-2}
work=${WORK:-$(mktemp -d /tmp/layersplice-distill-bench.XXXXXX)}
echo "work directory: $work"

"$py" - "$work" "$hidden" "$layers" "$vocab" "$seq" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

work, hidden, layers, vocab, seq = Path(sys.argv[1]), *map(int, sys.argv[2:])
config = LlamaConfig(
    vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
    num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, max_position_embeddings=seq,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=0,
)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
print(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {layers} layers")
model.save_pretrained(work / "teacher")
EOF
"$py" -m layersplice init-student --teacher "$work/teacher" --out "$work/student" --first 1 --every 2 --last 2

common=(--teacher "$work/teacher" --student "$work/student" --synthetic-data --seq-len "$seq"
        --batch-size "$batch" --micro-batch-size "$micro" --steps "$steps" --val-tokens 0
        --eval-every 0 --save-every 0 --device cuda)

echo "== plain process"
"$py" -m layersplice.distill.command "${common[@]}" --out "$work/plain"
echo "== torchrun --nproc_per_node $nproc (FSDP2, NCCL)"
"$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
    -m layersplice.distill.command "${common[@]}" --out "$work/fsdp"

"$py" - "$work" "$nproc" "$batch" "$seq" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

import torch

work, nproc, batch, seq = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, global batch {batch} x {seq} tokens")
for name, label in (("plain", "plain, 1 process"), ("fsdp", f"torchrun FSDP2, {nproc} process(es)")):
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    rate = statistics.median(r["tokens_per_s"] for r in steps[3:] or steps)
    memory = max(r["cuda_max_memory_gib"] for r in steps)
    print(f"{label:<32} {rate:>10,.0f} tokens/s   max_memory_allocated {memory:6.2f} GiB (rank 0)   "
          f"final loss {steps[-1]['loss']:.4f}")
EOF
