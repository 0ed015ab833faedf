"""The commit protocol of a dataset folder: how a version is committed, which version is current, and
when files may be removed. Delta Lake's transaction log, for a dataset of several tables. Pure: no
Prefect, Ray or torch.

Invariants (each is proven by breaking it in tests/test_commit.py and tests/test_versions.py):
1. The version file is the commit. Version n exists once `_versions/manifest-<n>.json` is created,
   exclusively (a hard link on local disk, a conditional PUT on S3), whole, in one step. That create is
   the only point where runs are ordered; two runs cannot both take version n.
2. The current version is the highest readable version file. `manifest.json` and the dataset card are
   pointers for readers that do not know this protocol (`datasets`, TRL, a person); every reader and
   writer here goes by `_versions/` and rewrites a stale pointer. A version file left by a crash is a
   committed version (it is whole) or unreadable (garbage: skipped, its number never reused); it never
   blocks a later commit.
3. A version lists every part of every table it holds; nothing else is part of the dataset. Parts are
   written once under names no other write uses (storage.py), so concurrent runs never touch each
   other's files, and a version never changes after its commit.
4. Nothing a retained version lists is removed. A version is retained while it is among the newest
   `keep_versions` + 1, or while it was current less than `retention_hours` ago. A file no retained
   version lists is removed only once it is older than `retention_hours` too, so a run still writing
   its parts (not yet committed) keeps them. This is Delta's VACUUM: the window must be longer than the
   longest build and the longest read.
5. Overlapping runs commit optimistically: a run that loses version n to another re-reads the current
   version, decides again (a failed rebuild does not replace a complete version) and takes n + 1. Each
   version is a whole snapshot of one run's input, so the folder always equals one clean build.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
from typing import Callable

from dafactory.tasks.io.storage import MANIFEST, REBUILD, VERSIONS, DatasetDir, failpoint

log = logging.getLogger(__name__)

PREFIX, SUFFIX = "manifest-", ".json"


class CommitConflict(FileExistsError):
    """Another run created this version file first."""


def version_name(n: int) -> str:
    return f"{PREFIX}{n:06d}{SUFFIX}"


def _number(name: str) -> int | None:
    core = name[len(PREFIX) : -len(SUFFIX)] if name.startswith(PREFIX) and name.endswith(SUFFIX) else ""
    return int(core) if core.isdigit() else None


def version_files(ds: DatasetDir) -> list[dict]:
    """The version files (readable or not), oldest first, each with its number, path and mtime."""
    found = [e | {"version": _number(e["name"])} for e in ds.listing(VERSIONS)]
    return sorted((e for e in found if e["version"] is not None), key=lambda e: e["version"])


def version_numbers(ds: DatasetDir) -> list[int]:
    return [e["version"] for e in version_files(ds)]


def read_version(ds: DatasetDir, n: int) -> dict | None:
    """Version n, or None when it is missing or unreadable (a version file with garbage in it)."""
    path = ds._path(VERSIONS, version_name(n))

    def read():
        try:
            with ds.fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    data = ds._retry(f"read {VERSIONS}/{version_name(n)}", read)
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("version") == n else None


def current(ds: DatasetDir, repair: bool = True) -> dict | None:
    """The current version: the highest readable version file (None before the first commit). With
    `repair`, a stale or missing `manifest.json` is rewritten to it (best effort: a reader without
    write rights still gets the right version)."""
    for e in reversed(version_files(ds)):
        manifest = read_version(ds, e["version"])
        if manifest is not None:
            if repair:
                _repair_pointer(ds, manifest)
            return manifest
    return None


def _repair_pointer(ds: DatasetDir, manifest: dict) -> None:
    try:
        pointer = ds._read_json(MANIFEST)
    except Exception:  # garbage in the pointer: rewrite it
        pointer = None
    if (pointer or {}).get("version") == manifest["version"]:
        return
    try:
        _replace(ds, MANIFEST, _encode(manifest))
        log.info("%s: manifest.json pointed at version %s; repaired to version %d", ds.uri,
                 (pointer or {}).get("version"), manifest["version"])
    except Exception as exc:  # a reader without write rights
        log.debug("could not repair %s/manifest.json: %s", ds.uri, exc)


def _encode(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, default=str).encode()


def commit(ds: DatasetDir, decide: Callable[[dict | None], dict | None], attempts: int = 20) -> tuple[dict, bool]:
    """Commit the version `decide(current)` returns, as the next version. `decide` sees the current
    version (None for a first build) and returns the new manifest, or None to keep the current one (a
    failed rebuild while a complete version stands). A run that loses the version number to another
    decides again on what that run committed. Returns (the current version, whether this call committed
    it)."""
    for _ in range(attempts):
        taken = version_numbers(ds)  # unreadable version files keep their numbers
        n = max([0, *taken]) + 1
        previous = current(ds, repair=False)
        manifest = decide(previous)
        if manifest is None:
            return previous, False
        manifest = manifest | {"version": n, "previous_version": (previous or {}).get("version")}
        data = _encode(manifest)
        try:
            ds._retry("commit the version", lambda: _create(ds, posixpath.join(VERSIONS, version_name(n)), data))
        except CommitConflict:
            log.warning("%s: another run committed version %d first; deciding again on it", ds.uri, n)
            continue
        failpoint("version")
        if (current(ds, repair=False) or {}).get("version") == n:  # a later version's writer owns the pointer
            ds._retry("write the manifest pointer", lambda: _replace(ds, MANIFEST, data))
        failpoint("pointer")
        return manifest, True
    raise RuntimeError(f"{ds.uri}: {attempts} commits in a row lost to other runs")


def write_pointer_file(ds: DatasetDir, rel: str, data: bytes, version: int) -> bool:
    """Write a file that describes a version (the dataset card), unless a later version is current."""
    if (current(ds, repair=False) or {}).get("version") != version:
        return False
    ds._retry(f"write {rel}", lambda: _replace(ds, rel, data))
    return True


def _replace(ds: DatasetDir, rel: str, data: bytes) -> None:
    """Replace a small file in one step: a rename on local disk, one PUT on object stores."""
    final = ds._path(rel)
    if not ds.local:
        with ds.fs.open(final, "wb") as f:
            f.write(data)
        return
    tmp = final + f".tmp-{uuid.uuid4().hex[:8]}"
    with ds.fs.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, final)


def _create(ds: DatasetDir, rel: str, data: bytes) -> None:
    """Exclusive create. A retry that finds its own bytes already there (the first try's PUT landed but
    its answer was lost) counts as done; anything else there is another run's: CommitConflict."""
    final = ds._path(rel)
    try:
        if not ds.local:
            with ds.fs.open(final, "xb") as f:  # a conditional PUT (If-None-Match) on S3
                f.write(data)
            return
        ds.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = final + f".tmp-{uuid.uuid4().hex[:8]}"
        with ds.fs.open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, final)  # atomic, and fails if the version exists
        finally:
            ds.fs.rm(tmp)
    except FileExistsError:
        with ds.fs.open(final, "rb") as f:
            if f.read() == data:
                return
        raise CommitConflict(posixpath.basename(final)) from None


def referenced(ds: DatasetDir, manifests: list[dict]) -> set[str]:
    """Paths of every file these versions list (parts and compact files), and of their parts tables."""
    paths = {ds._inside(m["parts_table"]) for m in manifests if m.get("parts_table")}
    paths |= {ds._inside(c) for m in manifests for c in ds.compacted(m).values()}
    return paths | {ds._inside(f) for m in manifests for files in ds.files(m).values() for f in files}


def vacuum(ds: DatasetDir, tables: list[str], keep_versions: int = 1, retention_hours: float = 168.0,
           now: float | None = None, dry_run: bool = False) -> dict:
    """Remove what no retained version needs (invariant 4): version files that are neither among the
    newest keep_versions + 1 nor were current within the window, then the files in the tables' folders
    that no retained version lists and that are older than the window (markers first, so a run that
    resumes never finds a marker whose shard's other parts are gone). Returns what it removed, by kind."""
    now = time.time() if now is None else now
    horizon = now - retention_hours * 3600
    files = version_files(ds)
    retained, dropped = [], []
    for i, e in enumerate(files):
        newest = i >= len(files) - keep_versions - 1
        # a version stopped being current when its successor was committed
        current_until = files[i + 1]["mtime"] if i + 1 < len(files) else now
        if newest or current_until is None or current_until >= horizon:
            retained.append(e)
        else:
            dropped.append(e)
    manifests = [m for m in (read_version(ds, e["version"]) for e in retained) if m is not None]
    still_listed = referenced(ds, manifests)  # every file a retained version lists
    marker_tables = {m.get("layout", {}).get("marker") for m in manifests} - {None}
    # parts tables no kept version names (and temporary files of interrupted writes there)
    old = [e["path"] for e in ds.listing(VERSIONS) if _number(e["name"]) is None and e["path"] not in still_listed
           and e["mtime"] is not None and e["mtime"] < horizon]
    for table in sorted(tables, key=lambda t: t not in marker_tables):  # markers first
        for e in ds.listing(table):
            if e["path"] not in still_listed and e["mtime"] is not None and e["mtime"] < horizon:
                old.append(e["path"])
    removed = {"versions": len(dropped), "files": len(old)}
    if not dry_run:
        ds.remove(old)
        ds.remove([e["path"] for e in dropped])
    return removed | {"retained_versions": [e["version"] for e in retained], "paths": old}


def record_rebuild(ds: DatasetDir, rebuild: dict) -> None:
    """What a failed or stopped rebuild got to, beside the version it kept."""
    ds.write_bytes(REBUILD, json.dumps(rebuild, indent=2).encode())


def clear_rebuild(ds: DatasetDir) -> None:
    path = ds._path(REBUILD)
    if ds._retry("look up the rebuild record", lambda: ds.fs.exists(path)):
        ds.remove([path])

