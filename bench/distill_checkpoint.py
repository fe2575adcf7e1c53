"""Checkpoint memory and time of `layersplice distill` under 2-process torchrun (gloo, CPU):
the sharded DCP save against the single-process gather it replaced, same model, one run.

    python bench/distill_checkpoint.py [--hidden 1024] [--layers 8] [--vocab 32000]

A random Llama-shaped teacher and its 1/2/2 student from `init-student`; the
student is sharded with FSDP2 over 2 processes and takes one AdamW step, so
the optimizer holds its moments. Then, each in a fresh pair of processes:

  * gather:    what a checkpoint was before: full model and optimizer state
               gathered to rank 0 (get_*_state_dict, full_state_dict and
               cpu_offload), written there with torch.save; resumed by rank 0
               reading it and broadcasting (broadcast_from_rank0);
  * dcp:       `distill`'s save_checkpoint as shipped (synchronous on CPU):
               each rank writes its shards, all hash, rank 0 seals and
               publishes; resumed by `begin` (which verifies every byte) and
               load_checkpoint;
  * dcp-async: the same with dcp.async_save forced on (what CUDA runs use),
               waited for at once.

Each rank's peak RSS during the save is its own high-water mark (VmHWM),
reset just before the save through /proc/self/clear_refs. Times are wall
seconds on rank 0: save until training could go on, complete until the
checkpoint is published (later only for an asynchronous save), resume
(`begin`'s verification, which hashes the teacher, the student and the
checkpoint, then the load). Last, 2 -> 1 process resumes of real `distill` runs
(--synthetic-data) against an uninterrupted one-process run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def vm(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def gather_save(student, optimizer, path: Path, world) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    from layersplice.distill import parallel

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    payload = {"model": get_model_state_dict(student, options=options),
               "optimizer": get_optimizer_state_dict(student, optimizer, options=options)}
    if world.is_main:
        torch.save(payload, path)
    parallel.barrier(world)


def gather_load(student, optimizer, path: Path, world) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    payload = torch.load(path, weights_only=True) if world.is_main else {"model": {}, "optimizer": {}}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(student, payload["model"], options=options)
    set_optimizer_state_dict(student, optimizer, payload["optimizer"], options=options)


def trained_student(root: Path, world, config):
    """The student sharded over the processes, after one AdamW step."""
    from transformers import AutoModelForCausalLM

    from layersplice.distill.loop import build_optimizer, build_scheduler
    from layersplice.distill.parallel import place

    torch.manual_seed(0)
    student = place(AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32), world, shard=True)
    optimizer = build_optimizer(student, config)
    scheduler = build_scheduler(optimizer, config)
    ids = torch.randint(student.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(world.rank))
    ids = ids.to(world.device)
    student(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return student, optimizer, scheduler


def measure(method: str, root: Path, device: str) -> None:
    """One method in this torchrun process; rank 0 prints every rank's figures as one JSON line.

    save_s is how long training is held up; published_s runs until the checkpoint is complete
    (the same unless the save is asynchronous)."""
    from layersplice.distill import checkpoints, parallel, sharded
    from layersplice.distill.config import DataSpec, DistillConfig

    world = parallel.start_world(device)
    out = root / f"out-{method}"
    config = DistillConfig(teacher=root / "teacher", student=root / "student", out=out,
                           data=DataSpec(synthetic=True, seq_len=64), steps=10, save_every=1, device=device)
    if method == "dcp-async":
        sharded.asynchronous = lambda world: True
    elif method == "dcp-sync":
        sharded.asynchronous = lambda world: False
    record = checkpoints.begin(config, world) if method != "gather" else None
    student, optimizer, scheduler = trained_student(root, world, config)
    gc.collect()
    parallel.barrier(world)
    before = vm("VmRSS")
    reset_peak()
    started = time.perf_counter()
    if method == "gather":
        out.mkdir(exist_ok=True)
        gather_save(student, optimizer, out / "state.pt", world)
    else:
        checkpoints.save_checkpoint(config, 1, student, optimizer, scheduler, {}, world, record)
    save_s = time.perf_counter() - started
    if method != "gather":
        record.settle(world, wait=True)
    parallel.barrier(world)
    published_s = time.perf_counter() - started
    peak = vm("VmHWM")
    cuda_peak = torch.cuda.max_memory_allocated(world.device) if world.device.type == "cuda" else 0

    started = time.perf_counter()
    if method == "gather":
        gather_load(student, optimizer, out / "state.pt", world)
        verify_s = 0.0
    else:
        record = checkpoints.begin(dataclasses.replace(config, resume=True), world)
        verify_s = time.perf_counter() - started
        checkpoints.load_checkpoint(config, student, optimizer, scheduler, world, record)
    parallel.barrier(world)
    resume_s = time.perf_counter() - started
    figures = parallel.gather_objects({"before": before, "peak": peak, "cuda_peak": cuda_peak}, world)
    if world.is_main:
        print(json.dumps({"method": method, "processes": world.size, "ranks": figures, "save_s": save_s,
                          "published_s": published_s, "verify_s": verify_s, "resume_s": resume_s}))
    parallel.stop_world(world)


def torchrun(processes: int, *argv: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{BENCH}")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def distill(processes: int, root: Path, out: Path, *extra: str) -> None:
    argv = ["-m", "layersplice.distill.command", "--teacher", str(root / "teacher"), "--student",
            str(root / "student"), "--out", str(out), "--synthetic-data", "--seq-len", "64", "--batch-size", "4",
            "--micro-batch-size", "1", "--val-tokens", "0", "--eval-every", "0", "--device", "cpu", *extra]
    torchrun(processes, *argv)


def resume_check(root: Path) -> None:
    """2 processes save at steps 2 and 4; one process resumes from each; compare with one uninterrupted process."""
    from safetensors.torch import load_file

    def weights(out: Path) -> dict:
        return load_file(out / "model.safetensors")

    def largest_difference(a: dict, b: dict) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    common = ("--steps", "4", "--save-every", "2")
    distill(1, root, root / "one", *common)
    distill(2, root, root / "two", *common)
    from_two_at_4 = root / "resume-at-4"
    shutil.copytree(root / "two", from_two_at_4)
    distill(1, root, from_two_at_4, *common, "--resume")  # nothing left to train: exports what it restored
    from_two_at_2 = root / "resume-at-2"
    shutil.copytree(root / "two", from_two_at_2)
    shutil.rmtree(from_two_at_2 / "checkpoints" / "step-0000004")
    distill(1, root, from_two_at_2, *common, "--resume")
    one, two = weights(root / "one"), weights(root / "two")
    at_4, at_2 = weights(from_two_at_4), weights(from_two_at_2)
    same = all(torch.equal(at_4[k], two[k]) for k in two)
    print(f"2 -> 1 resume at step 4 (4 of 4 steps done), exported by 1 process vs 2 processes' export: "
          f"{'bit-identical' if same else 'DIFFERENT'}")
    print(f"2 processes to step 2, 1 process to step 4, vs 1 uninterrupted process: largest |difference| "
          f"{largest_difference(at_2, one):.3g}")
    print(f"2 processes uninterrupted vs 1 uninterrupted process (FSDP's summation order alone): "
          f"{largest_difference(two, one):.3g}")
    print(f"2 processes to step 2, 1 process to step 4, vs 2 uninterrupted processes: "
          f"{largest_difference(at_2, two):.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--method", choices=["gather", "dcp", "dcp-sync", "dcp-async"],
                        help="measure one method in this torchrun process (bench/distill_gpu.sh runs these)")
    parser.add_argument("--root", type=Path, help="with --method: the folder holding teacher/ and student/")
    parser.add_argument("--device", default="cpu", help="with --method: cpu or cuda")
    args = parser.parse_args()
    if args.method:
        measure(args.method, args.root, args.device)
        return
    from distill_cpu import make_models

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_models(root, args.hidden, args.layers, args.vocab, 128)
        params = sum(t.numel() for t in load_student(root).values())
        print(f"torch {torch.__version__}; student {params / 1e6:.1f}M parameters "
              f"({params * 4 / 2**30:.2f} GiB fp32; AdamW state twice that); 2 processes, gloo, CPU", flush=True)
        results = {}
        for method in ("gather", "dcp", "dcp-async"):
            line = torchrun(2, __file__, "--method", method, "--root", str(root)).strip().splitlines()[-1]
            results[method] = result = json.loads(line)
            ranks = "  ".join(f"rank {r}: {f['before'] / 2**30:.2f} -> {f['peak'] / 2**30:.2f} GiB"
                              for r, f in enumerate(result["ranks"]))
            print(f"  {method:<9} peak RSS during save  {ranks};  save {result['save_s']:.2f} s (complete after "
                  f"{result['published_s']:.2f} s), resume {result['resume_s']:.2f} s (of which verify "
                  f"{result['verify_s']:.2f} s)", flush=True)
        gather = results["gather"]["ranks"][0]["peak"]
        for method in ("dcp", "dcp-async"):
            rank0, rank1 = (f["peak"] for f in results[method]["ranks"])
            print(f"{method}: rank 0 peak / gather's rank 0 peak {rank0 / gather:.2f} (target <= 0.6); "
                  f"rank 0 / rank 1 {rank0 / rank1:.2f}")
        resume_check(root)


def load_student(root: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for path in (root / "student").glob("*.safetensors") for k, v in load_file(path).items()}


if __name__ == "__main__":
    main()
