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
"""

from __future__ import annotations

from pathlib import Path

from layersplice import __version__
from layersplice.checkpoint.digest import CHECKSUM, blake3_file
from layersplice.checkpoint.sealed_json import read_sealed, replace_sealed

PROVENANCE_FILE = "layersplice.json"
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"


class FamilyProblem(Exception):
    """What is wrong with a family's records; callers turn it into their own error."""


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, CHECKSUM: blake3_file(path)}


def size_entry(directory: Path) -> dict:
    """The manifest entry of one size, read from its own sealed layersplice.json."""
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
    return entry


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


def _same_models(a: dict, b: dict) -> bool:
    """Sources agree when they name the same models at the same revisions (local cache paths may differ)."""
    def names(sources: dict) -> dict:
        return {role: (s.get("reference"), s.get("revision")) for role, s in sources.items()}

    return names(a) == names(b)


def combined_manifest(parts: dict[str, dict]) -> dict:
    """The manifest of every size the parts hold; raises FamilyProblem when parts disagree."""
    if not parts:
        raise FamilyProblem(f"no part records in {PARTS_DIR}/")
    first_name, first = next(iter(parts.items()))
    sizes: dict[str, dict] = {}
    for part_name, record in parts.items():
        if not _same_models(record["sources"], first["sources"]):
            raise FamilyProblem(
                f"{PARTS_DIR}/{part_name} was built from other models than {PARTS_DIR}/{first_name}; "
                "a family holds the sizes of one teacher/student pair"
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


def assemble(out: Path) -> dict:
    """Derive manifest.json from every part record in OUT and write it (sealed, atomically)."""
    manifest = combined_manifest(read_parts(out))
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


def assembly_problem(out: Path, manifest: dict) -> str | None:
    """Why OUT's manifest is not the whole family its parts and size directories hold, or None."""
    try:
        parts = read_parts(out)
        expected = combined_manifest(parts) if parts else None
    except FamilyProblem as exc:
        return str(exc)
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
