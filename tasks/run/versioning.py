"""Versions of a dataset as the build sees them: which planned shards are done and which write of each a new
version lists (shard_parts), which an interrupted or failed run may resume (resumable), and what a failed
rebuild leaves when a complete version stands (keep_previous). The commit itself is tasks/io/commit.py.

Invariants: a shard is done when its marker part (the table written last) and every other table's part of
the same name are there, and its marker is whole Parquet; a failed rebuild never replaces a complete version.
"""

from __future__ import annotations

from prefect import get_run_logger

from dafactory.tasks.io.commit import record_rebuild
from dafactory.tasks.io.redact import redact
from dafactory.tasks.io.storage import DatasetDir, part_key, part_name
from dafactory.tasks.run.planner import Plan


def shard_parts(ds: DatasetDir, plan: Plan, tables: list[str], previous: dict | None,
                built: dict[str, dict] | None = None) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Which planned shards are done, and the part name (`<shard id>@<token>`) of each: a shard is done
    when a marker part (its table written last) and every other table's part of that name are there.
    When several writes of a shard are (a retry, a concurrent run), this run's is taken, else the one
    the current version lists, else the first by name. One listing per table. Returns (shard id -> part
    name, table -> its listing)."""
    marker = tables[-1]
    listed = {t: ds.parts(t) for t in dict.fromkeys(tables)}
    required = [t for t in listed if t != "quarantine"]  # an empty quarantine has no part
    whole: dict[str, list[str]] = {}
    for name in listed[marker]:
        if all(name in listed[t] for t in required):
            whole.setdefault(part_key(name), []).append(name)
    in_previous = {part_name(f) for f in (ds.files(previous).get(marker, []) if previous else [])}
    built = built or {}
    chosen = {}
    for ref in plan.shards:
        names = sorted(whole.get(ref.shard_id, ()))
        if not names:
            continue
        ours = built.get(ref.shard_id, {}).get("part")
        chosen[ref.shard_id] = ours if ours in names else next((n for n in names if n in in_previous), names[0])
    return chosen, listed


def resumable(ds: DatasetDir, plan: Plan, tables: list[str], previous: dict | None) -> dict[str, dict]:
    """The stats (with their part name) of the planned shards that are done, read from their markers'
    footers, concurrently. A marker that is not whole Parquet (a truncated upload, a bad actor) does
    not count: its shard is built again. So does a shard with generation errors that no complete version
    holds (a run that failed on its error rate): what failed is retried, what a complete version holds is kept."""
    chosen, listed = shard_parts(ds, plan, tables, previous)
    marker, names = tables[-1], list(chosen.values())
    kept = set()
    if previous is not None and previous["status"] == "complete":
        kept = {part_name(f) for f in ds.files(previous).get(marker, [])}
    done, retried = {}, 0
    for name, stats in zip(names, ds.marker_stats([listed[marker][n] for n in names], errors=True)):
        if isinstance(stats, Exception):
            get_run_logger().warning("%s: the marker part %s is unreadable (%s); its shard is built again",
                                     ds.uri, name, str(stats).splitlines()[0][:120])
        elif stats.get("errors", {}).get("generation_error") and name not in kept:
            retried += 1
        else:
            done[part_key(name)] = stats | {"part": name}
    if retried:
        get_run_logger().info("%d shards written with generation errors are built again", retried)
    return done


def keep_previous(ds: DatasetDir, plan: Plan, report: dict, previous: dict) -> dict:
    """A rebuild that failed or was stopped: the last complete version stays the dataset; what this run
    got to is recorded in `_rebuild.json`, and its parts stay for the re-run."""
    rebuild = {
        "status": "incomplete", "stopped": report["stopped"], "version_kept": previous["version"],
        "error_rate": report.get("error_rate"),
        "shards": {"total": len(plan.shards), "resumed": report["resumed"], "built": report["built"],
                   "failed": report["failed"]},
    }
    record_rebuild(ds, redact(rebuild))
    get_run_logger().warning(
        "the rebuild is incomplete: version %d of %s stays the dataset; re-run to finish the new one",
        previous["version"], ds.uri)
    return previous | {"rebuild": rebuild}
