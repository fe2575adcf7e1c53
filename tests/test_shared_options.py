"""One vocabulary across commands: an option several commands take is one option.

Every command of the `layersplice` group is read by introspection (distill and
tokenize, loaded lazily, included), so a command added later, or an option changed in
one command only, is caught here. Options with the same name must agree in
type, help, default and kind; a few names mean each command's own thing and
are listed with the reason. The alignment rule's help is checked against what
the rule does.
"""

from __future__ import annotations

import click
import pytest

from layersplice.cli.main import cli
from layersplice.errors import AlignmentError
from layersplice.planning.alignment import Alignment, copied_from_rule

# Names that mean something of each command's own, with why.
OWN_MEANING = {
    "--out": "each command's own output (a checkpoint, a family, a report folder, a YAML file)",
    "--sizes": "build --all takes layer counts of the family; eval takes 'all' or --keep values (kept for scripts)",
    "--seq-len": "eval's perplexity windows against distill's packed training blocks (different defaults)",
    "--batch-size": "eval's windows per forward pass against distill's global batch of an optimizer step",
    "--data": "eval reads one held-out text; distill repeats it for training corpora",
}
MODEL_ROLES = ("--teacher", "--student", "--base-teacher")


def commands() -> dict[str, click.Command]:
    """Every command of the group, lazily loaded ones included."""
    ctx = click.Context(cli, resilient_parsing=True)  # resilient: the group loads lazy commands in full
    return {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}


def options(command: click.Command) -> dict[str, click.Option]:
    """The visible options of a command by their long name (hidden ones are deprecated spellings)."""
    found = {}
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            found[max(param.opts, key=len)] = param
    return found


def signature(option: click.Option) -> dict:
    kind = option.type
    described = {"type": type(kind).__name__}
    if isinstance(kind, click.Choice):
        described["choices"] = sorted(kind.choices)
    if isinstance(kind, click.Path):
        described["path"] = (kind.exists, kind.file_okay, kind.dir_okay)
    return {**described, "help": option.help, "default": option.default, "flag": option.is_flag,
            "multiple": option.multiple, "names": sorted(option.opts + option.secondary_opts),
            "metavar": option.metavar, "show_default": option.show_default}


def shared_names() -> list[str]:
    seen: dict[str, int] = {}
    for command in commands().values():
        for name in options(command):
            seen[name] = seen.get(name, 0) + 1
    return sorted(name for name, count in seen.items() if count > 1 and name not in OWN_MEANING)


def test_the_lazily_loaded_commands_are_compared_in_full():
    """distill and tokenize are loaded on demand; a stub without their options would compare nothing."""
    assert {"--lr", "--teacher", "--student-id", "--split"} <= set(options(commands()["distill"]))
    assert {"--num-proc", "--teacher-id", "--split", "--force"} <= set(options(commands()["tokenize"]))


@pytest.mark.parametrize("name", shared_names())
def test_a_shared_option_is_the_same_in_every_command(name):
    by_command = {command_name: signature(options(command)[name]) for command_name, command in commands().items()
                  if name in options(command)}
    first = next(iter(by_command.values()))
    assert all(sig == first for sig in by_command.values()), f"{name} differs: {by_command}"


def test_the_list_of_own_meanings_is_current():
    everything = {name for command in commands().values() for name in options(command)}
    assert set(OWN_MEANING) <= everything, "an OWN_MEANING entry no command uses any more"


@pytest.mark.parametrize("command_name", list(commands()))
def test_every_option_has_help(command_name):
    missing = [name for name, option in options(commands()[command_name]).items() if not option.help]
    assert not missing, f"{command_name}: no help for {', '.join(missing)}"


@pytest.mark.parametrize("command_name", list(commands()))
def test_a_command_naming_a_model_takes_its_revision_and_hub_id_under_one_name(command_name):
    names = set(options(commands()[command_name]))
    for role in MODEL_ROLES:
        if role in names:
            assert {f"{role}-revision", f"{role}-id"} <= names, f"{command_name} {role}"
            assert "--revision" not in names, f"{command_name}: --revision next to {role}; name whose revision it is"


def test_every_command_with_a_student_and_an_alignment_can_override_the_students_record():
    for command_name, command in commands().items():
        names = set(options(command))
        if {"--student", "--copied-teacher-layers"} <= names:
            assert {"--first", "--every", "--last", "--override-alignment"} <= names, command_name


def test_the_old_init_student_revision_spelling_still_works_hidden():
    revision = next(p for p in commands()["init-student"].params if "--revision" in p.opts)
    assert revision.hidden and revision.deprecated


def _one_layer_runs(alignment: Alignment) -> tuple[int, int]:
    """(one-layer blocks before the first longer block, one-layer blocks after the last one)."""
    lengths = [alignment.block_length(i) for i in range(alignment.n_student)]
    longer = [i for i, n in enumerate(lengths) if n > 1]
    return longer[0], len(lengths) - 1 - longer[-1]


def test_the_alignment_rule_does_what_its_help_says():
    """--first: blocks of --every layers start at teacher layer FIRST-1, the layers before stay one-layer
    blocks; --every: layers per block, the student keeps the first; --last: at least LAST trailing
    one-layer blocks. Checked on every small rule and teacher."""
    helps = {name: opt.help for name, opt in options(commands()["build"]).items()}
    assert "start at teacher layer FIRST-1" in helps["--first"]
    assert "the student keeps the first" in helps["--every"]
    assert "at least the last LAST" in helps["--last"]
    checked = 0
    for n_teacher in range(2, 30):
        for first in range(1, 5):
            for every in range(2, 5):
                for last in range(0, 4):
                    try:
                        alignment = Alignment(copied_from_rule(n_teacher, first, every, last), n_teacher)
                    except AlignmentError:
                        continue
                    if alignment.n_student == n_teacher:
                        continue  # no block fits: every layer stays its own
                    before, after = _one_layer_runs(alignment)
                    assert before == first - 1 and alignment.blocks[before][0] == first - 1
                    assert after >= last
                    longer = [b for b in alignment.blocks if b[1] - b[0] > 1]
                    assert all(end - start == every for start, end in longer)
                    checked += 1
    assert checked > 1000
