"""Checksums of checkpoint files: written at save, checked before a resume. Layer: checkpoint/.

Every checkpoint folder (`iter_NNNNNNN/`) holds `checksums.json`:

    {"algorithm": "xxh3_64", "files": {"actor/__0_0.distcp": {"size": 123, "digest": "9f..."}, ...}}

covering every file in the folder but itself. xxHash's XXH3 (64-bit) because it is the
fastest of the hashes measured on these machines (5.1 GB/s vs crc32 1.5 GB/s and sha256
0.4 GB/s, one core, 200 MB in memory): the point is to catch truncated or bit-flipped
files, not an adversary, and 64 bits make an undetected accidental corruption
vanishingly unlikely. Sizes are checked first, so a truncated file is caught without
reading it.

Pure Python, no torch.distributed: `megarlhf checkpoint verify PATH` and the collective
wrappers in dist_ckpt.py (each rank hashes its share of the files) both use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import xxhash

MANIFEST = "checksums.json"
ALGORITHM = "xxh3_64"
_CHUNK = 8 << 20


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_64()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(ckpt: Path) -> list[str]:
    """Every file under `ckpt` (relative, sorted), the manifest excepted."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def describe_files(ckpt: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "digest"}} for `names` (relative to `ckpt`)."""
    return {n: {"size": (ckpt / n).stat().st_size, "digest": file_digest(ckpt / n)} for n in names}


def write_manifest(ckpt: Path, files: dict[str, dict]) -> None:
    (ckpt / MANIFEST).write_text(json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}, indent=1) + "\n")


def read_manifest(ckpt: Path) -> dict[str, dict] | None:
    """The recorded files of `ckpt`, or None for a checkpoint saved without checksums."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest["algorithm"] != ALGORITHM:
            raise ValueError(f"unknown algorithm {manifest['algorithm']!r}")
        return manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        return {MANIFEST: {"size": -1, "digest": f"unreadable: {err}"}}


def check_files(ckpt: Path, expected: dict[str, dict], names: list[str]) -> list[str]:
    """Problems with `names` of the manifest `expected`: one line per missing, resized or
    changed file, naming it."""
    problems = []
    for name in names:
        want, path = expected[name], ckpt / name
        if want["size"] < 0:
            problems.append(f"{path}: {want['digest']}")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{path}: {size} bytes, {want['size']} when saved (truncated or overwritten)")
        elif file_digest(path) != want["digest"]:
            problems.append(f"{path}: contents changed since it was saved ({ALGORITHM} mismatch)")
    return problems


def verify_checkpoint(ckpt: str | Path) -> tuple[list[str], int]:
    """(problems, number of files checked) of one iter_ folder, on one process. A checkpoint
    without a manifest has one problem saying so."""
    ckpt = Path(ckpt)
    expected = read_manifest(ckpt)
    if expected is None:
        return [f"{ckpt}: no {MANIFEST} (saved before checksums were recorded): cannot verify"], 0
    return check_files(ckpt, expected, sorted(expected)), len(expected)
