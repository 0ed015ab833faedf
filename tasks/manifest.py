"""The manifest: what a finished dataset holds and how it was made. Pure: no Prefect, Ray or torch."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections import Counter
from importlib import metadata
from pathlib import Path

from tasks.prompts import PromptSet
from tasks.schemas import TABLES


def code_version() -> dict:
    version = {"package": "dafactory", "version": metadata.version("dafactory")}
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        if sha:
            version["git_commit"] = sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def sum_counters(dicts) -> dict:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


def build_manifest(
    *,
    config: dict,
    fingerprint: str,
    prompts: PromptSet,
    shard_stats: list[dict],
    counts: dict,
    outcomes_key: str,
    timings: dict,
    models: dict,
    shards_total: int,
    shards_resumed: int,
    pruned_parts: int,
    extra: dict | None = None,
) -> dict:
    quarantined = Counter(q["reason"] for q in prompts.quarantine)
    quarantined.update(sum_counters(s.get("quarantined", {}) for s in shard_stats))
    return {
        "status": "complete",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "config": config,
        "models": models,
        "code": code_version(),
        "tables": {name: c | {"schema": TABLES[name].to_string()} for name, c in counts.items()},
        "prompts": {
            "source_rows": prompts.source_rows,
            "unique": len(prompts.rows),
            "duplicates_removed": prompts.duplicates,
            "quarantined": dict(sorted(quarantined.items())),
        },
        "outcomes_key": outcomes_key,
        outcomes_key: sum_counters(s.get("outcomes", {}) for s in shard_stats),
        "shards": {"total": shards_total, "resumed": shards_resumed, "pruned_stale_parts": pruned_parts},
        "timings_s": timings,
    } | (extra or {})


def summary_rows(manifest: dict) -> list[dict]:
    """The short table printed by the CLI and published as a Prefect artifact."""
    rows = [{"what": f"{name} rows", "count": t["rows"]} for name, t in manifest["tables"].items()]
    p = manifest["prompts"]
    rows.append({"what": "prompts (unique)", "count": p["unique"]})
    rows.append({"what": "duplicate prompts removed", "count": p["duplicates_removed"]})
    rows += [{"what": f"quarantined: {k}", "count": v} for k, v in p["quarantined"].items()]
    key = manifest["outcomes_key"]
    label = {"unpaired_prompts": "no pair", "filtered_samples": "filtered"}.get(key, key)
    rows += [{"what": f"{label}: {k}", "count": v} for k, v in manifest[key].items()]
    return rows
