"""What a distill run is asked to do: frozen settings, checked once up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from layersplice.distill.losses import LossWeights
from layersplice.errors import LayerspliceError

DEFAULT_VAL_TOKENS = 2**18


class DistillError(LayerspliceError):
    """The distill settings do not fit together or do not fit the models."""


class DataError(LayerspliceError):
    """The training text cannot be read as asked."""


def first_line(error: BaseException) -> str:
    """An underlying library error cut to one line, to quote inside our own."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True)
class DataSpec:
    """Where the text comes from and how it is cut into blocks."""

    files: tuple[Path, ...] = ()
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    synthetic: bool = False
    seq_len: int = 2048
    val_tokens: int | None = None
    val_fraction: float | None = None
    shuffle_window: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        given = sum([bool(self.files), self.dataset is not None, self.synthetic])
        if given != 1:
            raise DataError(
                "give exactly one data source: --data FILE_OR_DIR (repeatable), "
                "--dataset NAME, or --synthetic-data"
            )
        if self.val_tokens is not None and self.val_fraction is not None:
            raise DataError("give --val-tokens or --val-fraction, not both")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.seq_len < 2:
            raise DataError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.shuffle_window < 1:
            raise DataError(f"--shuffle-window must be at least 1, got {self.shuffle_window}")

    @property
    def held_out_tokens(self) -> int:
        """Validation budget in tokens when no fraction is given."""
        return DEFAULT_VAL_TOKENS if self.val_tokens is None else self.val_tokens


@dataclass(frozen=True)
class RunSettings:
    """What the run was asked for, kept for its sealed record and its card."""

    values: dict  # every option, named as in a --config file (seq_len for --seq-len), after merging
    origins: dict  # option name -> "command line" or "config file", for each option not left at its default
    config_file: str | None = None


@dataclass(frozen=True)
class DistillConfig:
    """One distill run. Defaults are the reference recipe (METHOD.md §3)."""

    teacher: Path
    student: Path
    out: Path
    data: DataSpec
    steps: int = 500
    batch_size: int = 2048
    micro_batch_size: int = 4
    lr: float = 3e-4
    warmup: float = 0.01
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    loss: LossWeights = LossWeights()
    eval_every: int = 50
    save_every: int = 100
    resume: bool = False
    device: str = "auto"
    loss_chunk_tokens: int | None = None  # None: chosen from the vocabulary; 0: full logits
    shard_teacher: bool = False
    compile: bool = False
    activation_checkpointing: bool = False
    peak_tflops: float | None = None
    keep_checkpoints: bool = False
    settings: RunSettings | None = None  # None: not started from the command line

    def __post_init__(self) -> None:
        positive = {
            "--steps": self.steps,
            "--batch-size": self.batch_size,
            "--micro-batch-size": self.micro_batch_size,
            "--temperature": self.loss.temperature,
        }
        for flag, value in positive.items():
            if value <= 0:
                raise DistillError(f"{flag} must be positive, got {value}")
        if not 0 <= self.warmup < 1:
            raise DistillError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 0:
            raise DistillError(
                f"--loss-chunk-tokens must be >= 0 (0: full logits), got {self.loss_chunk_tokens}"
            )
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise DistillError(f"--peak-tflops must be positive, got {self.peak_tflops}")
        if self.eval_every < 0 or self.save_every < 0:
            raise DistillError("--eval-every and --save-every must be >= 0 (0 turns them off)")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise DistillError(
                f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                f"{self.micro_batch_size} x {world_size} processes; change one of them"
            )
        return self.batch_size // per_step

    def run_identity(self) -> dict:
        """Settings a resumed run must share with the run it continues.

        The process count, the micro-batch size and the ways of computing (loss
        chunks, sharding, compilation, checkpointing) are left out on purpose:
        they change how the global batch is computed, not what it is; so are
        the models' paths (they may differ between machines) and what is kept.
        """
        identity = asdict(self)
        how = ("loss_chunk_tokens", "shard_teacher", "compile", "activation_checkpointing", "peak_tflops")
        kept = ("keep_checkpoints", "settings")
        for key in ("teacher", "student", "out", "resume", "device", "micro_batch_size", *how, *kept):
            identity.pop(key)
        identity["data"]["files"] = [str(p) for p in self.data.files]
        return identity


# Settings whose command-line option is not the field's name with dashes.
_OPTION_NAMES = {"data.files": "--data", "data.synthetic": "--synthetic-data",
                 "loss.kl": "--kl-weight", "loss.cos": "--cos-weight"}


def _flatten(identity: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in identity.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: object) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


def identity_changes(old: dict, new: dict) -> list[str]:
    """Each setting that differs between two run identities, as `--option old -> new`."""
    before, after = _flatten(old), _flatten(new)
    missing = object()
    changes = []
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key, missing), after.get(key, missing)
        if was != now:
            option = _OPTION_NAMES.get(key, "--" + key.rpartition(".")[2].replace("_", "-"))
            was_text = "(not recorded)" if was is missing else _shown(was)
            now_text = "(no longer a setting)" if now is missing else _shown(now)
            changes.append(f"{option} {was_text} -> {now_text}")
    return changes
