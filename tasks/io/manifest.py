"""The manifest: what a finished dataset holds and how it was made. Pure: no Prefect, Ray or torch."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from importlib import metadata, resources
from pathlib import Path

from dafactory.tasks.io.gitcommit import tree_commit
from dafactory.tasks.io.schemas import TABLES


def code_version() -> dict:
    """The installed package's version and the commit it was built from: baked into a wheel at build
    time (setup.py), or, for a checkout installed in editable mode, that checkout's HEAD. Never the git
    repository that happens to surround the environment."""
    version = {"package": "dafactory", "version": metadata.version("dafactory")}
    commit = _baked_commit() or _checkout_commit()
    if commit:
        version["git_commit"] = commit
    return version


def _baked_commit() -> str:
    baked = resources.files("dafactory.tasks") / "_commit.txt"
    return baked.read_text().strip() if baked.is_file() else ""


def _checkout_commit() -> str:
    root = Path(__file__).resolve().parents[2]  # tasks/io/manifest.py -> the source tree's root
    project = root / "pyproject.toml"
    if not project.is_file() or 'name = "dafactory"' not in project.read_text():
        return ""
    return tree_commit(root, timeout_s=5)


def sum_counters(dicts) -> dict:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


def accounting(plan, shard_stats: list[dict], failed: list[dict]) -> dict:
    """Where every source row went. Each row ends in exactly one place: set aside at input (with a
    reason), or in a planned shard; each planned prompt has output rows, is quarantined by its shard
    (with a reason), or sits in a shard that failed or was never built. `balanced` says the counts add up."""
    prompts_out = sum(s.get("prompts_out", 0) for s in shard_stats)
    shard_quarantined = sum(sum(s.get("quarantined", {}).values()) for s in shard_stats)
    in_failed = sum(f["prompts"] for f in failed)
    built = sum(s.get("prompts", 0) for s in shard_stats)
    not_built = plan.unique - built - in_failed
    input_set_aside = sum(plan.quarantined.values())
    return {
        "source_rows": plan.source_rows,
        "set_aside_at_input": input_set_aside,
        "planned_prompts": plan.unique,
        "prompts_with_output": prompts_out,
        "prompts_quarantined_in_shards": shard_quarantined,
        "prompts_in_failed_shards": in_failed,
        "prompts_in_unbuilt_shards": not_built,
        "balanced": plan.source_rows == input_set_aside + plan.unique
        and plan.unique == prompts_out + shard_quarantined + in_failed + not_built
        and built == prompts_out + shard_quarantined,
    }


def _rate(amount: float, seconds: float) -> float | None:
    return round(amount / seconds, 3) if seconds > 0 else None


def _stage_work(stats: list[dict], stage: str) -> dict:
    """A stage's work summed over shards' stats: shards that recorded it, samples, busy seconds, tokens."""
    found = [s["work"][stage] for s in stats if stage in s.get("work", {})]
    total = {"shards": len(found), "samples": 0, "busy_s": 0.0} | sum_counters(found)
    return total | {"busy_s": round(total["busy_s"], 3)}


def occupancy(run: dict, replica_s: float) -> dict:
    """The generate engines' occupancy over this run (tasks/generate/generation.py's occupancy() counts each
    call of an engine that takes one at a time; tasks/generate/feed.py each step of a streaming one): the share of the replicas' held seconds when the engine ran below 90% of its batch limit, idle
    time between calls included, and the share of its sequence slots that held a running sequence."""
    idle = max(0.0, replica_s - run["engine_s"])
    return {"engine_s": round(run["engine_s"], 3), "idle_s": round(idle, 3),
            "below_90pct_share": _rate(run["below_s"] + idle, replica_s),
            "slot_use": _rate(run.get("slot_steps", 0), run.get("slot_capacity", 0))}


def price(cpu_s: float, gpu_s: float, prices: dict) -> float | None:
    """Cost units of these resource-seconds at the prices per hour (an unset price counts as 0); None
    when neither price is set."""
    per_cpu, per_gpu = prices.get("per_cpu_hour"), prices.get("per_gpu_hour")
    if per_cpu is None and per_gpu is None:
        return None
    return cpu_s * (per_cpu or 0.0) / 3600 + gpu_s * (per_gpu or 0.0) / 3600


def build_cost(report: dict, shard_stats: list[dict], prices: dict | None) -> dict:
    """What the build cost, per stage (the README's manifest section says what each figure means).

    Work (samples, tokens, busy seconds) is summed over this version's shards, those resumed from an
    earlier run included (their stats come from their footers), and again under `this_run` over the
    shards this run built. Resource-seconds are this run's only: replicas x CPUs (GPUs) per replica, as
    asked of Ray, x the seconds the replicas were held (from when all were ready to when they were
    killed)."""
    prices = {k: (prices or {}).get(k) for k in ("per_gpu_hour", "per_cpu_hour")}
    run_stats = list(report.get("stats", {}).values())
    held = round(report.get("held_s", 0.0), 3)
    wall = round(report.get("seconds", {}).get("build_wall", 0.0), 3)
    stages = {}
    for st in report.get("stages", []):
        total, run = _stage_work(shard_stats, st["name"]), _stage_work(run_stats, st["name"])
        if "generated_tokens" in total:  # a stage that generates: this run's tokens too, 0 when it built none
            run = {"prompt_tokens": 0, "generated_tokens": 0} | run
        cpu_s = round(st["replicas"] * st["num_cpus"] * held, 3)
        gpu_s = round(st["replicas"] * st["num_gpus"] * held, 3)
        this_run = run | {
            "samples_per_s": _rate(run["samples"], run["busy_s"]),
            **({"tokens_per_s": _rate(run["generated_tokens"], run["busy_s"])} if "generated_tokens" in run else {}),
            "held_s": held,
            "busy_share": _rate(run["busy_s"], st["replicas"] * held),
            "cpu_s": cpu_s,
            "gpu_s": gpu_s,
            "cost": price(cpu_s, gpu_s, prices),
        }
        if "engine_s" in run:
            this_run["occupancy"] = occupancy(run, st["replicas"] * held)
        stages[st["name"]] = {"replicas": st["replicas"], "num_cpus": st["num_cpus"], "num_gpus": st["num_gpus"],
                              **total, "this_run": this_run}
    first = next(iter(stages.values()), {}).get("this_run", {})
    costs = [e["this_run"]["cost"] for e in stages.values()]
    return {
        "prices": prices,
        "prompt_tokens": "once per prompt",  # not once per sample
        "wall_s": wall,
        "held_s": held,
        "samples_per_s": _rate(first.get("samples", 0), wall),
        "tokens_per_s": _rate(first.get("generated_tokens", 0), wall),
        "stages": stages,
        "total": {
            "cpu_s": round(sum(e["this_run"]["cpu_s"] for e in stages.values()), 3),
            "gpu_s": round(sum(e["this_run"]["gpu_s"] for e in stages.values()), 3),
            "cost": None if None in costs else sum(costs),
        },
    }


def build_manifest(
    *,
    config: dict,
    fingerprint: str,
    plan,
    shard_stats: list[dict],
    counts: dict,
    outcomes_key: str,
    timings: dict,
    models: dict,
    report: dict,
    replaced_parts: int,
    extra: dict | None = None,
) -> dict:
    quarantined = Counter(plan.quarantined)
    quarantined.update(sum_counters(s.get("quarantined", {}) for s in shard_stats))
    # by shard id: a resumed shard keeps the index of the plan that built it
    done = {s["shard_id"] for s in shard_stats} & {ref.shard_id for ref in plan.shards}
    complete = (not report["failed"] and not report["stopped"] and not report.get("error_rate")
                and len(done) == len(plan.shards))
    return {
        "status": "complete" if complete else "incomplete",
        "stopped": report["stopped"],
        # the run-level max_error_rate rule fired (tasks/generate/error_rate.py): why, else None
        "error_rate": report.get("error_rate"),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "config": config,
        "models": models,
        "code": code_version(),
        "tables": {name: c | {"schema": TABLES[name].to_string()} for name, c in counts.items()},
        "prompts": {
            "source_rows": plan.source_rows,
            "unique": plan.unique,
            "duplicates_removed": plan.duplicates,
            "quarantined": dict(sorted(quarantined.items())),
            # set aside by the screen, by rule: contaminated by method and eval set, duplicates by method
            "screened": getattr(plan, "screened", {}) or {},
        },
        "accounting": accounting(plan, shard_stats, report["failed"]),
        # Errors by kind and exception type, in the shards that built (quarantined as generation_error).
        "errors": {kind: sum_counters(s.get("errors", {}).get(kind, {}) for s in shard_stats)
                   for kind in sorted({k for s in shard_stats for k in s.get("errors", {})})},
        "outcomes_key": outcomes_key,
        outcomes_key: sum_counters(s.get("outcomes", {}) for s in shard_stats),
        "candidate_counts": sum_counters(s.get("candidates", {}) for s in shard_stats),
        "shards": {
            "total": len(plan.shards),
            "buckets": plan.buckets,
            "done": len(shard_stats),
            "resumed": report["resumed"],
            "built": report["built"],
            # built shards whose parts the driver wrote, because their replica could not
            "written_by_driver": report.get("written_by_driver", 0),
            # tries of shards whose prompts the driver read and sent, because their first-stage replica could not
            "read_by_driver": report.get("read_by_driver", 0),
            "failed": report["failed"],
            "not_built": len(plan.shards) - len(shard_stats) - len(report["failed"]),
            # parts the previous version listed and this one does not (removed by vacuum after the retention)
            "replaced_parts": replaced_parts,
        },
        "timings_s": timings,
        "gpu_slot": report.get("gpu_slot") or None,  # when this build held the GPU slot, and how long it waited
        "cost": build_cost(report, shard_stats, config.get("cost")),
    } | (extra or {})


def summary_rows(manifest: dict, cost: bool = True) -> list[dict]:
    """The short table printed by the CLI and published as a Prefect artifact (the CLI prints the cost
    rows as a table of their own: cost=False)."""
    rows = [{"what": f"{name} rows", "count": t["rows"]} for name, t in manifest["tables"].items()]
    if manifest["status"] != "complete":
        s = manifest["shards"]
        rows.insert(0, {"what": f"INCOMPLETE: shards done of {s['total']}", "count": s["done"]})
        rows.insert(1, {"what": "shards failed", "count": len(s["failed"])})
    p = manifest["prompts"]
    rows.append({"what": "prompts (unique)", "count": p["unique"]})
    rows += [{"what": f"quarantined: {k}", "count": v} for k, v in p["quarantined"].items()]
    screened = p.get("screened") or {}
    rows += [{"what": f"  contaminated: {method} vs {name}", "count": n}
             for method, sets in screened.get("contaminated", {}).items() for name, n in sets.items()]
    rows += [{"what": f"  near_duplicate: {method}", "count": n}
             for method, n in screened.get("near_duplicate", {}).items()]
    key = manifest["outcomes_key"]
    label = {"unpaired_prompts": "no pair", "filtered_samples": "filtered"}.get(key, key)
    rows += [{"what": f"{label}: {k}", "count": v} for k, v in manifest[key].items()]
    rows += [{"what": f"candidates: {k}", "count": v} for k, v in manifest.get("candidate_counts", {}).items()]
    return rows + (cost_rows(manifest.get("cost")) if cost else [])


def cost_rows(cost: dict | None) -> list[dict]:
    """The manifest's cost as summary rows: tokens of the whole dataset, throughput and resource-seconds
    of this run."""
    if not cost:
        return []
    rows = []
    for stage, e in cost["stages"].items():
        run = e["this_run"]
        if "generated_tokens" in e:
            rows += [{"what": f"{stage}: prompt tokens", "count": e["prompt_tokens"]},
                     {"what": f"{stage}: generated tokens", "count": e["generated_tokens"]},
                     {"what": f"{stage}: tokens/s (this run, per busy replica)", "count": run.get("tokens_per_s")}]
        rows += [{"what": f"{stage}: samples/s (this run, per busy replica)", "count": run["samples_per_s"]},
                 {"what": f"{stage}: busy share (this run)", "count": run["busy_share"]},
                 {"what": f"{stage}: CPU-seconds (this run)", "count": run["cpu_s"]}]
        if "occupancy" in run:
            rows.append({"what": f"{stage}: share of time below 90% of its batch limit (this run)",
                         "count": run["occupancy"]["below_90pct_share"]})
        if e["num_gpus"]:
            rows.append({"what": f"{stage}: GPU-seconds (this run)", "count": run["gpu_s"]})
        if run["cost"] is not None:
            rows.append({"what": f"{stage}: estimated cost (this run)", "count": round(run["cost"], 6)})
    rows.append({"what": "build: samples/s (this run, wall clock)", "count": cost["samples_per_s"]})
    if cost["total"]["cost"] is not None:
        rows.append({"what": "estimated cost (this run)", "count": round(cost["total"]["cost"], 6)})
    return rows


CARD = "README.md"


def artifact_key(dataset: str, what: str) -> str:
    """A Prefect artifact key for this dataset (lowercase letters, digits and dashes), so that builds of
    different datasets running at once never overwrite each other's progress or summary."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{dataset}-{what}".lower()).strip("-")


def screening_lines(manifest: dict) -> list[str]:
    """The card's account of the input's screen: contaminated prompts by method and evaluation set,
    duplicates by method (none for a recipe without a screen)."""
    p, cfg = manifest["prompts"], manifest["config"]
    if "decontamination" not in cfg:
        return []
    screened = p.get("screened") or {}
    decon = cfg["decontamination"]
    sets = ", ".join(decon["eval_sets"]) if decon["enabled"] else "off"
    lines = ["", f"Input screen: decontaminated against {sets}; "
             f"{p['quarantined'].get('contaminated', 0)} prompts contaminated, "
             f"{p['quarantined'].get('near_duplicate', 0)} near duplicates dropped (in `quarantine`).", "",
             "| rule | dropped |", "| --- | ---: |"]
    lines += [f"| contaminated: {m} vs {name} | {n} |" for m, per in screened.get("contaminated", {}).items()
              for name, n in per.items()]
    lines += [f"| near duplicate: {m} | {n} |" for m, n in screened.get("near_duplicate", {}).items()]
    return lines


def dataset_card(manifest: dict, main_table: str, files: dict[str, list[str]]) -> str:
    """A Hugging Face dataset card for the folder: `configs:` front matter with one config per table
    (its data_files are exactly the version's parts, `files`, so no glob ever picks up a stale or staged part),
    then counts, models and provenance. `datasets.load_dataset("<folder>", "<table>")` reads it, and the
    folder can be uploaded to the Hub as it is."""
    import yaml

    # only tables with rows: `datasets` refuses a config whose files hold none ("corresponds to no data");
    # the counts table below still names the empty ones
    tables = [t for t, entry in manifest["tables"].items() if files.get(t) and entry["rows"]]
    tables.sort(key=lambda t: t != main_table)  # the main table is the default config
    configs = [
        {"config_name": t, "data_files": [{"split": "train", "path": files[t]}]}
        | ({"default": True} if t == main_table else {})
        for t in tables
    ]
    name = manifest["config"]["dataset"]
    front = yaml.safe_dump({"configs": configs, "pretty_name": name, "tags": ["dafactory", manifest["flow"]]},
                           sort_keys=False)
    code = manifest["code"]
    lines = [
        "---", front.rstrip("\n"), "---", "", f"# {name}", "",
        f"A `{manifest['flow']}` dataset built by {code['package']} {code['version']}"
        + (f" (commit {code['git_commit']})" if code.get("git_commit") else "")
        + f" on {manifest['created_at']}; config hash `{manifest['fingerprint']}`, version {manifest.get('version', 1)}, "
        f"status **{manifest['status']}**. `manifest.json` beside this card has the full config and accounting.",
        "", "| table | rows | parts |", "| --- | ---: | ---: |",
        *(f"| {t} | {manifest['tables'][t]['rows']} | {manifest['tables'][t]['parts']} |" for t in manifest["tables"]),
        *screening_lines(manifest),
        "", "Models:", "",
        *(f"- {role}: `{json.dumps(m, sort_keys=True)}`" for role, m in manifest["models"].items() if role != "workers"),
        "", "Load a table:", "", "```python", "from datasets import load_dataset",
        f'ds = load_dataset("path/to/{name}", "{main_table}", split="train")', "```", "",
    ]
    return "\n".join(lines)
