"""`layersplice transfer`: init(V) + (S - init(B)) on tiny random models, checked
against torch computing the formula from the three checkpoints' own tensors."""

from __future__ import annotations

import json
import math
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ALIGNMENTS, VOCAB
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from layersplice.cli.main import cli

COPIED = ALIGNMENTS["1-2-2"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _save(source: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """`tensors` as a checkpoint beside `source`'s config, tokenizer and student_config.json."""
    out.mkdir()
    for path in source.iterdir():
        if path.suffix == ".json" and not path.name.endswith(".index.json"):
            shutil.copyfile(path, out / path.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _in_dtype(source: Path, out: Path, dtype: torch.dtype) -> Path:
    return _save(source, out, {k: v.to(dtype) for k, v in _tensors(source).items()})


def _variant_of(base: Path, out: Path, seed: int = 7, scale: float = 0.05) -> Path:
    """Every element of every tensor of the base moved a little, in the base's dtype."""
    generator = torch.Generator().manual_seed(seed)
    moved = {
        k: (v.float() + scale * torch.randn(v.shape, generator=generator)).to(v.dtype)
        for k, v in _tensors(base).items()
    }
    return _save(base, out, moved)


@pytest.fixture(scope="module")
def trio(checkpoints, tmp_path_factory):
    """(base teacher, variant, student) of an architecture in a dtype, made once."""
    root = tmp_path_factory.mktemp("transfer")
    made: dict[tuple[str, str], tuple[Path, Path, Path]] = {}

    def get(arch: str, dtype: str) -> tuple[Path, Path, Path]:
        if (arch, dtype) not in made:
            pair = checkpoints(arch, COPIED)
            base = _in_dtype(pair.teacher_dir, root / f"{arch}-{dtype}-base", DTYPES[dtype])
            student = _in_dtype(pair.student_dir, root / f"{arch}-{dtype}-student", DTYPES[dtype])
            made[arch, dtype] = base, _variant_of(base, root / f"{arch}-{dtype}-variant"), student
        return made[arch, dtype]

    return get


def _invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _transfer(base: Path, variant: Path, student: Path, out: Path, *options: str) -> Path:
    result = _invoke("transfer", "--base-teacher", base, "--teacher", variant, "--student", student,
                     "--out", out, *options)
    if result.exit_code != 0:
        trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        pytest.fail(f"transfer exited {result.exit_code}\n{result.output}\n{trace}")
    return out


def _teacher_name(student_name: str) -> str:
    """The teacher tensor init-student copies into a student tensor: layer i is teacher layer COPIED[i]."""
    parts = student_name.split(".")
    if parts[:2] == ["model", "layers"]:
        parts[2] = str(COPIED[int(parts[2])])
    return ".".join(parts)


def _expected(base: Path, variant: Path, student: Path) -> dict[str, torch.Tensor]:
    b, v, s = _tensors(base), _tensors(variant), _tensors(student)
    expected = {}
    for name, s_tensor in s.items():
        t = _teacher_name(name)
        s32, b32, v32 = s_tensor.float(), b[t].float(), v[t].float()
        formula = v32 + (s32 - b32)
        expected[name] = torch.where(v32 == b32, s32, formula).to(s_tensor.dtype)
    return expected


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_transfer_equals_torch_computing_the_formula(trio, tmp_path, arch, dtype):
    base, variant, student = trio(arch, dtype)
    out = _transfer(base, variant, student, tmp_path / "out")
    written, expected = _tensors(out), _expected(base, variant, student)
    assert set(written) == set(expected)
    unequal = [name for name in expected if not torch.equal(written[name], expected[name])]
    assert unequal == []
    assert all(written[name].dtype == DTYPES[dtype] for name in written)


def test_the_output_keeps_the_students_dtype_when_the_teachers_are_stored_in_another(trio, tmp_path):
    base, variant, _ = trio("qwen3", "bf16")
    _, _, student = trio("qwen3", "fp32")
    out = _transfer(base, variant, student, tmp_path / "out")
    written, expected = _tensors(out), _expected(base, variant, student)
    assert all(written[name].dtype == torch.float32 for name in written)
    assert [name for name in expected if not torch.equal(written[name], expected[name])] == []


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_a_variant_equal_to_its_base_gives_the_student_byte_for_byte(trio, tmp_path, dtype):
    base, _, student = trio("llama", dtype)
    out = _transfer(base, base, student, tmp_path / "out", "--json")
    written, original = _tensors(out), _tensors(student)
    assert set(written) == set(original)
    assert all(torch.equal(written[k].view(torch.uint8), original[k].view(torch.uint8)) for k in original)


def test_the_output_loads_in_transformers_and_builds_every_size_of_the_variant(trio, tmp_path):
    base, variant, student = trio("qwen3", "fp32")
    out = _transfer(base, variant, student, tmp_path / "out")
    assert json.loads((out / "student_config.json").read_text())["copied_teacher_layers"] == list(COPIED)
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    written = _tensors(out)
    assert all(torch.equal(state[name], tensor) for name, tensor in written.items())
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(ids).logits).all()

    sizes = tmp_path / "sizes"
    result = _invoke("build", "--teacher", variant, "--student", out, "--all", "--out", sizes)
    assert result.exit_code == 0, result.output
    manifest = json.loads((sizes / "manifest.json").read_text())
    assert [s["layers"] for s in manifest["sizes"]] == [4, 5, 6]
    result = _invoke("verify", "--against-sources", sizes)
    assert result.exit_code == 0, result.output


def test_verify_against_sources_recomputes_the_arithmetic(trio, tmp_path):
    base, variant, student = trio("llama", "bf16")
    variant_copy = shutil.copytree(variant, tmp_path / "variant")
    out = _transfer(base, variant_copy, student, tmp_path / "out")
    assert _invoke("verify", out).exit_code == 0
    result = _invoke("verify", "--against-sources", out)
    assert result.exit_code == 0, result.output

    # The variant changes after the transfer: the output's own checksums still hold, the arithmetic does not.
    changed = _tensors(variant_copy)
    changed["model.norm.weight"] = changed["model.norm.weight"] + 1
    (variant_copy / "model.safetensors").unlink()
    save_file(changed, variant_copy / "model.safetensors", metadata={"format": "pt"})
    assert _invoke("verify", out).exit_code == 0
    result = _invoke("verify", "--against-sources", out)
    assert result.exit_code == 2
    assert "model.norm.weight" in result.output and "teacher + (student - base_teacher)" in result.output


def test_the_delta_similarity_is_recorded_and_reported(trio, tmp_path):
    base, variant, student = trio("llama", "fp32")
    # A variant whose change is the student's change doubled: cosine 1 wherever anything changed.
    b, s = _tensors(base), _tensors(student)
    doubled = dict(b)
    for name, tensor in s.items():
        doubled[_teacher_name(name)] = b[_teacher_name(name)] + 2 * (tensor - b[_teacher_name(name)])
    aligned = _save(base, tmp_path / "aligned", doubled)
    result = _invoke("transfer", "--base-teacher", base, "--teacher", aligned, "--student", student,
                     "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    similarity = json.loads(result.output)["delta_similarity"]
    assert similarity["total"] == pytest.approx(1.0, abs=1e-5)
    assert [row["teacher_layer"] for row in similarity["layers"]] == list(COPIED)
    assert all(row["cosine"] == pytest.approx(1.0, abs=1e-5) for row in similarity["layers"])
    recorded = json.loads((tmp_path / "out" / "layersplice.json").read_text())
    assert recorded["delta_similarity"] == similarity
    assert set(recorded["sources"]) == {"base_teacher", "teacher", "student"}

    # The independent figure: torch's cosine over all tensors of the random variant.
    v = _tensors(variant)
    dv = torch.cat([(v[_teacher_name(n)].double() - b[_teacher_name(n)].double()).flatten() for n in s])
    ds = torch.cat([(s[n].double() - b[_teacher_name(n)].double()).flatten() for n in s])
    report = _invoke("transfer", "--base-teacher", base, "--teacher", variant, "--student", student,
                     "--out", tmp_path / "random", "--report")
    assert report.exit_code == 0, report.output
    recorded = json.loads((tmp_path / "random" / "layersplice.json").read_text())["delta_similarity"]
    assert recorded["total"] == pytest.approx(torch.nn.functional.cosine_similarity(dv, ds, dim=0).item(), abs=1e-4)
    assert "layer 3" in report.output and "total" in report.output


def _random_model(config, directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def _llama(**changes):
    from conftest import ARCHITECTURES

    return type(ARCHITECTURES["llama"]())(**{**ARCHITECTURES["llama"]().to_dict(), **changes})


# Each refusal: the options that make the mismatch, and words its one line must hold.
REFUSALS = {
    "family": (lambda ctx: {"--teacher": ctx.checkpoints("qwen3", COPIED).teacher_dir}, "is qwen3"),
    "hidden size": (lambda ctx: {"--teacher": _random_model(_llama(hidden_size=64, head_dim=16), ctx.tmp / "v", 3)},
                    "hidden sizes differ"),
    "vocabulary": (lambda ctx: {"--teacher": _random_model(_llama(vocab_size=2 * VOCAB), ctx.tmp / "v", 3)},
                   "vocabularies differ"),
    "layer count": (lambda ctx: {"--teacher": _random_model(_llama(num_hidden_layers=8), ctx.tmp / "v", 3)},
                    "(variant) has 8"),
    "tied head": (lambda ctx: {"--teacher": ctx.checkpoints("llama-tied", COPIED).teacher_dir}, "does not tie its head"),
    "tensor names": (lambda ctx: {"--teacher": _save(ctx.base, ctx.tmp / "v", {**_tensors(ctx.base), "extra.weight": torch.ones(2)})},
                     "'extra.weight'"),
    "dtypes": (lambda ctx: {"--teacher": _in_dtype(ctx.base, ctx.tmp / "v", torch.bfloat16)}, "BF16"),
    "student layers": (lambda ctx: {"--copied-teacher-layers": "0,2,4", "--override-alignment": None},
                       "student does not match"),
    "student's record": (lambda ctx: {"--copied-teacher-layers": "0,1,3,5"}, "records 0,2,4,5"),
    "student head": (lambda ctx: {"--student": ctx.checkpoints("llama-tied", COPIED).student_dir},
                     "student does not match"),
}


@dataclass
class _Context:
    checkpoints: object
    tmp: Path
    base: Path


@pytest.mark.parametrize("mismatch", sorted(REFUSALS))
def test_each_mismatch_is_refused_in_one_line_before_anything_is_written(checkpoints, trio, tmp_path, mismatch):
    make, words = REFUSALS[mismatch]
    base, variant, student = trio("llama", "fp32")
    options = {"--base-teacher": base, "--teacher": variant, "--student": student,
               **make(_Context(checkpoints, tmp_path, base))}
    work = tmp_path / "work"
    work.mkdir()
    arguments = [item for option, value in options.items() for item in ((option,) if value is None else (option, value))]
    result = _invoke("transfer", *arguments, "--out", work / "out")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.output
    assert list(work.iterdir()) == []


def test_the_output_never_replaces_one_of_its_inputs(trio, tmp_path):
    base, variant, student = trio("llama", "fp32")
    earlier = _transfer(base, variant, student, tmp_path / "earlier")  # a layersplice output, so --force could replace it
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    result = _invoke("transfer", "--base-teacher", base, "--teacher", variant, "--student", earlier,
                     "--out", earlier, "--force")
    assert result.exit_code == 2 and "is the student" in result.output, result.output
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


def test_hub_ids_and_revisions_name_the_three_models(trio, tmp_path):
    import os
    import subprocess
    import sys

    from hub_support import put_snapshot as _put_snapshot
    from test_hub_cache import COMMIT_A, COMMIT_B

    base, variant, student = trio("llama", "bf16")
    cache = tmp_path / "hub"
    _put_snapshot(cache, "org/base", COMMIT_A, base)
    _put_snapshot(cache, "org/variant", COMMIT_A, variant)
    _put_snapshot(cache, "org/variant", COMMIT_B, base, ref=None)  # an older revision: the base itself
    _put_snapshot(cache, "org/student", COMMIT_A, student)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "layersplice", "transfer", "--base-teacher", "org/base", "--teacher", "org/variant",
         "--teacher-revision", COMMIT_B, "--student", "org/student", "--out", str(out)],
        capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stderr
    sources = json.loads((out / "layersplice.json").read_text())["sources"]
    assert {role: s["reference"] for role, s in sources.items()} == {
        "base_teacher": "org/base", "teacher": "org/variant", "student": "org/student"}
    assert sources["teacher"]["revision"] == COMMIT_B
    written, original = _tensors(out), _tensors(student)  # revision B is the base: the student comes back
    assert all(torch.equal(written[k].view(torch.uint8), original[k].view(torch.uint8)) for k in original)


# The model whose tensor holds the bad value, the tensor's name in it, the value, as the error names it.
NON_FINITE = {
    "variant-nan": (1, "model.layers.2.mlp.up_proj.weight", math.nan, "teacher (variant)", "NaN"),
    "base-inf": (0, "model.layers.2.self_attn.q_proj.weight", math.inf, "base teacher", "inf"),
    "student-nan": (2, "model.layers.1.mlp.down_proj.weight", math.nan, "student", "NaN"),
    "student-minus-inf": (2, "model.norm.weight", -math.inf, "student", "-inf"),
}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_a_non_finite_source_is_refused_naming_the_tensor_and_the_model(trio, tmp_path, case, dtype):
    which, name, value, model, shown = NON_FINITE[case]
    models = list(trio("llama", dtype))
    tensors = _tensors(models[which])
    tensors[name].view(-1)[5] = value
    models[which] = _save(models[which], tmp_path / "bad", tensors)
    work = tmp_path / "work"
    work.mkdir()
    result = _invoke("transfer", "--base-teacher", models[0], "--teacher", models[1], "--student", models[2],
                     "--out", work / "out", "--json")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {models[which] / 'model.safetensors'}: tensor '{name}' of the {model} holds {shown} at "
                     "element 5; transfer refuses non-finite weights, which would spread into the student"]
    assert list(work.iterdir()) == []


def test_a_result_beyond_the_students_dtype_is_refused(trio, tmp_path):
    base, variant, student = trio("llama", "fp32")
    name = "model.layers.2.mlp.up_proj.weight"
    b, v = _tensors(base), _tensors(variant)
    b[name].view(-1)[7], v[name].view(-1)[7] = -3e38, 3e38  # finite, but v + (s - b) is not
    work = tmp_path / "work"
    work.mkdir()
    result = _invoke("transfer", "--base-teacher", _save(base, tmp_path / "b", b), "--teacher",
                     _save(variant, tmp_path / "v", v), "--student", student, "--out", work / "out")
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "error: tensor 'model.layers.1.mlp.up_proj.weight': teacher + (student - base_teacher) is inf at element 7, "
        "beyond the range of the student's F32; transfer refuses to write it")
    assert list(work.iterdir()) == []


def test_transfer_json_is_strict_json_when_nothing_changed(trio, tmp_path):
    base, _, student = trio("llama", "fp32")
    result = _invoke("transfer", "--base-teacher", base, "--teacher", base, "--student", student,
                     "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    similarity = json.loads(result.stdout, parse_constant=refuse)["delta_similarity"]
    assert similarity["total"] is None and all(row["cosine"] is None for row in similarity["layers"])
