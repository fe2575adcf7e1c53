"""A family of sizes in one directory, built whole or in parts.

Layout of OUT:

    OUT/<name>-<L>L/            one size: weights, README.md, sealed layersplice.json
    OUT/parts/<name>-<L..>.json one sealed record per `build --all [--sizes]` run
    OUT/manifest.json           sealed: every size of every part, derived from parts/

Each part's record is named for the sizes it holds, so parts built on
different machines and copied into one OUT (`cp -r`, `rsync`, artifact
downloads) never overwrite each other's records. manifest.json has one fixed
name, so after such a copy it is whichever part's came last; it is always
derivable from parts/ (`layersplice assemble OUT`), and `verify OUT` fails,
naming the fix, while it does not equal that derivation.

Records are cross-checked, by `assemble` and by `verify`: every part names
its sources with what pins their bytes (the commit a Hub id resolved to, or a
content digest of a local directory), and parts whose sources differ are
refused; every entry of a part or of the manifest must equal the entry
derived from the sealed layersplice.json of the size it names, and that
record must name the part's sources.
"""

from __future__ import annotations

from pathlib import Path

from layersplice import __version__
from layersplice.checkpoint.digest import CHECKSUM, blake3_file
from layersplice.checkpoint.sealed_json import read_sealed, replace_sealed
from layersplice.checkpoint.source import COMMIT_KEY

PROVENANCE_FILE = "layersplice.json"
DISTILLED = "distill"  # the kind of layersplice.json that `distill` seals into its --out
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"


class FamilyProblem(Exception):
    """What is wrong with a family's records; callers turn it into their own error."""


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, CHECKSUM: blake3_file(path)}


def size_entry(directory: Path) -> dict:
    """The manifest entry of one size, read from its own sealed layersplice.json."""
    return _size_record(directory)[0]


def _size_record(directory: Path) -> tuple[dict, dict]:
    """(the manifest entry of one size, the sources its sealed layersplice.json names)."""
    provenance, problem = read_sealed(directory / PROVENANCE_FILE)
    if problem:
        raise FamilyProblem(f"{directory}: {problem}")
    files = {**provenance["files"], PROVENANCE_FILE: file_record(directory / PROVENANCE_FILE)}
    entry = {
        "directory": directory.name,
        "layers": len(provenance["layers"]),
        "parameters": provenance["parameters"],
        "patched_blocks": provenance["patched_blocks"],
        "files": files,
        "bytes": sum(f["size"] for f in files.values()),
    }
    found = searched_size(provenance.get("choice"), entry["layers"], entry["patched_blocks"])
    if found is not None:
        entry["search"] = {key: found[key] for key in ("kl", "greedy_kl", "method")}
    return entry, provenance["sources"]


def searched_size(choice: dict | None, layers: int, patched) -> dict | None:
    """This size's entry in the record of the --order search that chose its blocks, if one did."""
    search = (choice or {}).get("search") or {}
    return next((s for s in search.get("sizes", ()) if s["layers"] == layers
                 and sorted(s["patched_blocks"]) == sorted(patched)), None)


def part_file_name(name: str, layers: list[int]) -> str:
    return f"{name}-{'-'.join(f'{n}L' for n in sorted(layers))}.json"


def part_record(sources: dict, entries: list[dict]) -> dict:
    return {"layersplice_version": __version__, "sources": sources, "sizes": _sorted(entries)}


def _sorted(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda e: (e["layers"], e["directory"]))


def read_parts(out: Path) -> dict[str, dict]:
    """{file name: record} of every part record in OUT/parts/ (empty when there is none)."""
    parts = {}
    folder = out / PARTS_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        record, problem = read_sealed(path)
        if problem:
            raise FamilyProblem(f"{path}: {problem}")
        parts[path.name] = record
    return parts


def _pinned(source: dict) -> str:
    """A source as a difference is told: the Hub id at its commit, or the local content digest."""
    if COMMIT_KEY in source:
        return f"{source['reference']} at commit {source[COMMIT_KEY]}"
    if CHECKSUM in source:
        return f"{source['reference']} with content {CHECKSUM} {source[CHECKSUM]}"
    return f"{source.get('reference')} at revision {source.get('revision')}"


def _same_source(a: dict, b: dict) -> bool:
    """The same bytes: one Hub id at one commit, or local directories of one content digest
    (their paths may differ between machines). Records written before sources carried
    either are compared by the name and revision asked for."""
    if COMMIT_KEY in a and COMMIT_KEY in b:
        return (a["reference"], a[COMMIT_KEY]) == (b["reference"], b[COMMIT_KEY])
    if CHECKSUM in a and CHECKSUM in b:
        return a[CHECKSUM] == b[CHECKSUM]
    return (a.get("reference"), a.get("revision")) == (b.get("reference"), b.get("revision"))


def _source_difference(a: dict, b: dict) -> tuple[str, str, str] | None:
    """(role, a's source, b's source) of the first role whose sources differ, or None when all agree."""
    for role in sorted(a.keys() | b.keys()):
        if role not in a or role not in b or not _same_source(a[role], b[role]):
            return role, _pinned(a.get(role, {})), _pinned(b.get(role, {}))
    return None


def combined_manifest(parts: dict[str, dict]) -> dict:
    """The manifest of every size the parts hold; raises FamilyProblem when parts disagree."""
    if not parts:
        raise FamilyProblem(f"no part records in {PARTS_DIR}/")
    first_name, first = next(iter(parts.items()))
    sizes: dict[str, dict] = {}
    for part_name, record in parts.items():
        difference = _source_difference(record["sources"], first["sources"])
        if difference is not None:
            role, its, theirs = difference
            raise FamilyProblem(
                f"{PARTS_DIR}/{part_name} was built from other models than {PARTS_DIR}/{first_name}: its {role} is "
                f"{its}, theirs {theirs}; a family holds the sizes of one teacher/student pair"
            )
        for entry in record["sizes"]:
            if sizes.setdefault(entry["directory"], entry) != entry:
                raise FamilyProblem(
                    f"{entry['directory']} is recorded differently by two parts (one of them is stale); "
                    f"rebuild that size with --force, or remove the stale record from {PARTS_DIR}/"
                )
    return {
        "layersplice_version": __version__,
        "sources": first["sources"],
        "parts": sorted(parts),
        "sizes": _sorted(list(sizes.values())),
    }


def refuse_other_sources(out: Path, sources: dict) -> None:
    """Raise FamilyProblem when a part already in OUT was built from other sources than `sources`."""
    for part_name, record in read_parts(out).items():
        difference = _source_difference(record["sources"], sources)
        if difference is not None:
            role, its, this_run = difference
            raise FamilyProblem(f"{PARTS_DIR}/{part_name} was built from other models: its {role} is {its}, "
                                f"this run's {this_run}")


def records_problem(out: Path, where: str, entries: list[dict], sources: dict | None = None) -> str | None:
    """Why an entry of a part or manifest disagrees with the sealed layersplice.json of the size it
    names (any field, now or added later: the entry is derived again and compared whole), or why that
    record names other sources than `sources` (a part's); None when all agree."""
    for entry in entries:
        name = entry.get("directory")
        if not isinstance(name, str) or Path(name).name != name:
            return f"{where}: size directory {name!r} is not a plain name"
        try:
            own, own_sources = _size_record(out / name)
        except FamilyProblem as exc:
            return f"{where} lists {name}, but {exc}"
        differ = sorted(key for key in own.keys() | entry.keys() if own.get(key) != entry.get(key))
        if differ:
            return (
                f"{where} records {name} with other {', '.join(differ)} than {name}/{PROVENANCE_FILE}; the "
                f"record is stale or was edited: rebuild that size with --force, or remove the stale record"
            )
        if sources is not None and own_sources != {role: _without_identity(s) for role, s in sources.items()}:
            return f"{name}/{PROVENANCE_FILE} names other sources than {where}; rebuild that size with --force"
    return None


def _without_identity(source: dict) -> dict:
    return {key: value for key, value in source.items() if key not in (COMMIT_KEY, CHECKSUM)}


def checked_manifest(out: Path, parts: dict[str, dict]) -> dict:
    """The manifest OUT's parts make, each part cross-checked against the records of its sizes;
    raises FamilyProblem naming the first disagreement."""
    manifest = combined_manifest(parts)
    for part_name, record in parts.items():
        problem = records_problem(out, f"{PARTS_DIR}/{part_name}", record["sizes"], record["sources"])
        if problem:
            raise FamilyProblem(problem)
    return manifest


def assemble(out: Path) -> dict:
    """Derive manifest.json from every part record in OUT and write it (sealed, atomically)."""
    manifest = checked_manifest(out, read_parts(out))
    replace_sealed(out / MANIFEST_FILE, manifest)
    return manifest


def write_part(out: Path, name: str, sources: dict, directories: list[str]) -> Path:
    """Record one part (its sizes read from their own layersplice.json) in OUT/parts/."""
    entries = [size_entry(out / d) for d in directories]
    (out / PARTS_DIR).mkdir(exist_ok=True)
    path = out / PARTS_DIR / part_file_name(name, [e["layers"] for e in entries])
    replace_sealed(path, part_record(sources, entries))
    return path


def refresh_parts(out: Path) -> dict:
    """After sizes were re-sealed in place: every part's entries re-read from its sizes, then the manifest."""
    for part_name, record in read_parts(out).items():
        entries = [size_entry(out / e["directory"]) for e in record["sizes"]]
        replace_sealed(out / PARTS_DIR / part_name, {**record, "sizes": _sorted(entries)})
    return assemble(out)


def family_record(out: Path) -> tuple[dict, Path, dict]:
    """(the models a family was built from, the layersplice.json of its first size, that record)."""
    manifest, problem = read_sealed(out / MANIFEST_FILE)
    if problem:
        raise FamilyProblem(problem)
    if not manifest["sizes"]:
        raise FamilyProblem(f"{MANIFEST_FILE} lists no size")
    path = out / manifest["sizes"][0]["directory"] / PROVENANCE_FILE
    record, problem = read_sealed(path)
    if problem:
        raise FamilyProblem(f"{path}: {problem}")
    return manifest["sources"], path, record


def assembly_problem(out: Path, manifest: dict) -> str | None:
    """Why OUT's manifest is not the whole family its parts and size directories hold, or None."""
    try:
        parts = read_parts(out)
        expected = checked_manifest(out, parts) if parts else None
    except FamilyProblem as exc:
        return str(exc)
    problem = records_problem(out, MANIFEST_FILE, manifest["sizes"])
    if problem:
        return problem
    fix = f"run `layersplice assemble {out}` after copying parts together"
    if expected is not None:
        listed = {e["directory"] for e in manifest["sizes"]}
        missing = sorted(e["directory"] for e in expected["sizes"] if e["directory"] not in listed)
        if missing:
            return f"{MANIFEST_FILE} lacks {', '.join(missing)} recorded in {PARTS_DIR}/; {fix}"
        if manifest["sizes"] != expected["sizes"]:
            return f"{MANIFEST_FILE} does not match the part records in {PARTS_DIR}/; {fix}"
    listed = {e["directory"] for e in manifest["sizes"]}
    # Hidden folders are temporaries of writes in progress or killed, not sizes.
    unlisted = sorted(
        p.parent.name for p in out.glob(f"*/{PROVENANCE_FILE}")
        if p.parent.name not in listed and not p.parent.name.startswith(".")
    )
    if unlisted:
        return (
            f"{', '.join(unlisted)} in {out} but not in {MANIFEST_FILE}; copy its part record into "
            f"{out / PARTS_DIR} and {fix}"
        )
    return None
