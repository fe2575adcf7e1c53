#!/usr/bin/env bash
# GPU throughput, MFU and memory of `layersplice distill`, one prepared run of
# under 10 minutes on one GPU (see BUDGET). A random Llama-shaped teacher (hidden 1024, 16
# layers, untied head: 317M parameters at vocab 32,000) and its 1/2/2 student
# from init-student (9 layers, 207M), random-token batches (--synthetic-data:
# no tokenizer or dataset download), bf16 autocast, STEPS optimizer steps of
# BATCH x SEQ tokens, micro-batch MICRO. At vocab 32,000 and 151,936:
#   full      the full-logit loss (--loss-chunk-tokens 0): the path before chunking;
#   plain     one process, chunked CE and KL (the default);
#   compile   the same with --compile;
#   torchrun  torchrun --nproc_per_node NPROC (NPROC=1: one process, no FSDP);
#   tokens    plain, on text instead of random tokens: standard-library
#             docstrings tokenized once by `layersplice tokenize` (the fixture's
#             3,072-id tokenizer, whose ids fit either vocabulary) and read from
#             the memory map.
#   checkpoint  under torchrun with NPROC processes, bench/distill_checkpoint.py
#             --device cuda: the student takes one AdamW step, then one checkpoint
#             is saved and resumed, as distill does it (dcp: each rank its own
#             shards, dcp.async_save; dcp-sync: the same, synchronous) and
#             as it did before (gather: everything gathered to rank 0 and
#             written by torch.save).
# Prints, for each run, the median tokens/s and MFU (first steps dropped as
# warm-up; MFU against the GPU's dense bf16 peak, or PEAK_TFLOPS), the share
# of step time spent waiting for data (data_wait_s / step_s over every step:
# random tokens are drawn, tokenized data read, one step ahead in a thread),
# the largest torch.cuda.max_memory_allocated and that per token of a
# micro-batch; then the targets: compile MFU >= 35%, torchrun >= 0.95x plain,
# memory per token at vocab 151,936 <= 1/3 of the full-logit path's, and data
# wait <= 1% of step time with tokenized data; then, for checkpoint, how
# long training is held up by a save, when the checkpoint is complete, and the
# resume time (verification included). Needs no network.
#
# Each run is cut at RUN_TIMEOUT seconds, and runs that would start after
# BUDGET seconds (540: the whole script stays under 10 minutes) are skipped,
# the most important first: vocab 151,936 before 32,000.
#
#   bash bench/distill_gpu.sh
#   STEPS=8 VOCABS="151936" RUNS="full plain" bash bench/distill_gpu.sh
# Settings (environment): NPROC STEPS HIDDEN LAYERS VOCABS RUNS SEQ BATCH MICRO
#                         RUN_TIMEOUT BUDGET PEAK_TFLOPS WORK PYTHON
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself; no install needed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

missing=$("$py" - <<'EOF'
import importlib.util
needed = ["torch", "transformers", "safetensors", "click", "rich", "yaml", "huggingface_hub", "numpy", "blake3"]
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "distill_gpu.sh: this Python ($("$py" -c 'import sys; print(sys.executable)')) lacks: $missing" >&2
    echo "  layersplice needs them (see pyproject.toml); install them from a wheelhouse or a mirror, e.g." >&2
    echo "  pip install --no-index --find-links WHEELS transformers safetensors click rich pyyaml huggingface_hub numpy blake3" >&2
    echo "  (do not let pip replace the installed CUDA torch)" >&2
    exit 1
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "distill_gpu.sh: torch sees no CUDA device" >&2
    exit 1
fi

nproc=${NPROC:-1}
steps=${STEPS:-10}
hidden=${HIDDEN:-1024}
layers=${LAYERS:-16}
vocabs=${VOCABS:-"151936 32000"}
runs=${RUNS:-"full plain tokens compile torchrun checkpoint"}
seq=${SEQ:-2048}
batch=${BATCH:-16}
micro=${MICRO:-2}
run_timeout=${RUN_TIMEOUT:-150}
budget=${BUDGET:-540}
work=${WORK:-$(mktemp -d /tmp/layersplice-distill-bench.XXXXXX)}
peak=()
[ -n "${PEAK_TFLOPS:-}" ] && peak=(--peak-tflops "$PEAK_TFLOPS")
echo "work directory: $work"

make_pair() {  # VOCAB: a random teacher built from a config, and its student
    local dir=$work/v$1
    "$py" - "$dir" "$hidden" "$layers" "$1" "$seq" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

out, hidden, layers, vocab, seq = Path(sys.argv[1]), *map(int, sys.argv[2:])
config = LlamaConfig(
    vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
    num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, max_position_embeddings=seq,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=0,
)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
print(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {layers} layers, vocab {vocab}")
model.save_pretrained(out / "teacher")
EOF
    "$py" -m layersplice init-student --teacher "$dir/teacher" --out "$dir/student" --first 1 --every 2 --last 2
}

make_tokens() {  # VOCAB: text tokenized with the fixture's tokenizer, given to the teacher
    local dir=$work/v$1
    cp "$repo"/fixtures/tiny-teacher/tokenizer.json "$repo"/fixtures/tiny-teacher/tokenizer_config.json "$dir/teacher/"
    "$py" - "$dir/text.jsonl" <<'EOF'
import sys
from pathlib import Path

from layersplice.evaluation.stdlib_text import CALIBRATION_MODULES, HELD_OUT_MODULES, write_documents

write_documents(Path(sys.argv[1]), CALIBRATION_MODULES + HELD_OUT_MODULES)
EOF
    "$py" -m layersplice tokenize --teacher "$dir/teacher" --data "$dir/text.jsonl" --seq-len "$seq" \
        --val-tokens 0 --out "$dir/tokenized"
}

distill() {  # NAME VOCAB LAUNCHER...: one run; a failure or timeout is reported, not fatal
    local name=$1 vocab=$2 out=$work/v$2/$1
    shift 2
    local data=(--synthetic-data --val-tokens 0)
    [ "$name" = tokens ] && data=(--data "$work/v$vocab/tokenized")  # its validation split is made already
    local common=(--teacher "$work/v$vocab/teacher" --student "$work/v$vocab/student" "${data[@]}"
                  --seq-len "$seq" --batch-size "$batch" --micro-batch-size "$micro" --steps "$steps"
                  --eval-every 0 --save-every 0 --device cuda --out "$out" "${peak[@]}")
    local left=$((budget - (SECONDS - started)))
    if [ "$left" -lt 30 ]; then
        echo "== vocab $vocab: $name skipped (BUDGET ${budget}s spent)"
        return
    fi
    local limit=$((left < run_timeout ? left : run_timeout))
    echo "== vocab $vocab: $name (at most ${limit}s)"
    case $name in
        full)     timeout "$limit" "$py" -m layersplice.distill.command "${common[@]}" --loss-chunk-tokens 0 ;;
        plain|tokens) timeout "$limit" "$py" -m layersplice.distill.command "${common[@]}" ;;
        compile)  timeout "$limit" "$py" -m layersplice.distill.command "${common[@]}" --compile ;;
        torchrun) timeout "$limit" "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
                      -m layersplice.distill.command "${common[@]}" ;;
        checkpoint)  # one JSON line per method, from rank 0
            for method in gather dcp dcp-sync; do
                timeout "$limit" "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
                    "$repo/bench/distill_checkpoint.py" --method "$method" --device cuda --root "$work/v$vocab" \
                    | tail -n 1 >> "$work/v$vocab/checkpoint.jsonl"
            done ;;
    esac || echo "   $name at vocab $vocab failed or ran past ${limit}s"
}

started=$SECONDS
for vocab in $vocabs; do
    make_pair "$vocab"
    case " $runs " in *" tokens "*) make_tokens "$vocab" ;; esac
    for name in $runs; do
        distill "$name" "$vocab"
    done
done
echo "all runs: $((SECONDS - started)) s"

"$py" - "$work" "$micro" "$seq" "$batch" "$nproc" "$vocabs" "$runs" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

import torch

work, micro, seq, batch, nproc = Path(sys.argv[1]), *map(int, sys.argv[2:6])
vocabs, runs = sys.argv[6].split(), sys.argv[7].split()
print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, global batch {batch} x {seq} tokens, "
      f"micro-batch {micro}, torchrun with {nproc} process(es)")
print(f"{'vocab':>7} {'run':<9} {'tokens/s':>10} {'MFU':>7} {'data wait':>9} {'max_memory_allocated':>21} "
      f"{'MiB/token':>10} {'final loss':>10}")
results = {}
for vocab in vocabs:
    for name in runs:
        if name == "checkpoint":
            continue
        path = work / f"v{vocab}" / name / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        steps = [r for r in records if "tokens_per_s" in r]
        if not steps:
            print(f"{vocab:>7} {name:<9} {'(no result)':>10}")
            continue
        kept = steps[3:] or steps
        rate = statistics.median(r["tokens_per_s"] for r in kept)
        mfu = statistics.median(r["mfu"] for r in kept) if "mfu" in kept[0] else None
        memory = max(r["cuda_max_memory_gib"] for r in steps)
        per_token = memory * 1024 / (micro * seq)
        wait = sum(r["data_wait_s"] for r in steps) / sum(r["step_s"] for r in steps)
        results[vocab, name] = (rate, mfu, per_token, wait)
        mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
        print(f"{vocab:>7} {name:<9} {rate:>10,.0f} {mfu_text:>7} {wait:>9.2%} {memory:>17.2f} GiB "
              f"{per_token:>10.3f} {steps[-1]['loss']:>10.4f}")

print("\ntargets")
for vocab in vocabs:
    if (vocab, "compile") in results and results[vocab, "compile"][1] is not None:
        print(f"  vocab {vocab}: --compile MFU {results[vocab, 'compile'][1]:.1%} (target >= 35%)")
    if (vocab, "torchrun") in results and (vocab, "plain") in results:
        ratio = results[vocab, "torchrun"][0] / results[vocab, "plain"][0]
        print(f"  vocab {vocab}: torchrun / plain tokens/s {ratio:.3f} (target >= 0.95)")
    if (vocab, "full") in results and (vocab, "plain") in results:
        ratio = results[vocab, "plain"][2] / results[vocab, "full"][2]
        print(f"  vocab {vocab}: memory per token, chunked / full logits {ratio:.3f} (target <= 0.333 at 151936)")
    if (vocab, "tokens") in results:
        print(f"  vocab {vocab}: data wait with tokenized data {results[vocab, 'tokens'][3]:.2%} of step time "
              "(target <= 1%)")

if "checkpoint" in runs:
    print(f"\ncheckpoints of the student after one AdamW step, torchrun with {nproc} process(es): save = training "
          "held up, complete = checkpoint published, resume = verify (hashes teacher, student, checkpoint) + load")
    for vocab in vocabs:
        path = work / f"v{vocab}" / "checkpoint.jsonl"
        lines = [line for line in path.read_text().splitlines() if line.startswith("{")] if path.is_file() else []
        if not lines:
            print(f"{vocab:>7} checkpoint (no result)")
        for record in map(json.loads, lines):
            cuda = max(rank["cuda_peak"] for rank in record["ranks"]) / 2**30
            print(f"{vocab:>7} {record['method']:<9} save {record['save_s']:7.2f} s  complete "
                  f"{record['published_s']:7.2f} s  resume {record['resume_s']:7.2f} s (verify "
                  f"{record['verify_s']:.2f} s)  max_memory_allocated {cuda:.2f} GiB")
EOF
