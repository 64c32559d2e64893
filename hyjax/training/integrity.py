"""Digests of checkpoint files, so a damaged checkpoint is found before it is restored.

Orbax writes a checkpoint atomically (a temporary folder renamed when complete), but nothing checks the
files afterwards: a cut or missing array file fails deep inside tensorstore, and flipped bytes restore
silently as other numbers. So once a checkpoint is on disk, each process writes
`<step>/hyjax_digest.process_<i>.json`: size and SHA-256 of every file it wrote (under `ocdbt.process_<i>`
or `process_<i>`; process 0 also every file of no process), and `problems` checks them again.

A file no digest lists (a checkpoint of an older hyjax, or one whose run stopped before its digest was
written) is not checked: Orbax's rename still guarantees it was complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re

DIGEST_PREFIX = "hyjax_digest.process_"
_OWNER = re.compile(r"process_(\d+)$")


def owner(relative: pathlib.PurePath) -> int:
    """The process that wrote the checkpoint file at `relative` (inside a step folder)."""
    for part in relative.parts[:-1]:
        match = _OWNER.search(part)
        if match:
            return int(match.group(1))
    return 0


def digest_path(step_dir: pathlib.Path, process: int) -> pathlib.Path:
    return step_dir / f"{DIGEST_PREFIX}{process}.json"


def file_digest(path: pathlib.Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_digest(step_dir: pathlib.Path, process: int) -> None:
    """Records size and SHA-256 of the files `process` wrote in the finished checkpoint `step_dir`."""
    files = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(DIGEST_PREFIX)):
        relative = path.relative_to(step_dir)
        if owner(relative) == process:
            files[relative.as_posix()] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    target = digest_path(step_dir, process)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps({"files": files}, indent=0))
    os.replace(partial, target)  # a digest is whole or absent


def problems(step_dir: pathlib.Path, process: int = 0, processes: int = 1) -> list[str]:
    """What is wrong with checkpoint `step_dir` by the digests this process checks (those of writer
    processes `process`, `process + processes`, ...): one line per missing, cut or changed file."""
    found = []
    for digest in sorted(step_dir.glob(f"{DIGEST_PREFIX}*.json")):
        writer = int(digest.name[len(DIGEST_PREFIX):-len(".json")])
        if writer % processes != process:
            continue
        try:
            files = json.loads(digest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            found.append(f"{digest.name}: unreadable (the digest itself is damaged)")
            continue
        for name, expected in files.items():
            path = step_dir / name
            if not path.is_file():
                found.append(f"{name}: missing")
            elif path.stat().st_size != expected["bytes"]:
                found.append(f"{name}: {path.stat().st_size:,} bytes, written with {expected['bytes']:,}")
            elif file_digest(path) != expected["sha256"]:
                found.append(f"{name}: contents changed since it was written (SHA-256 differs)")
    return found
