"""The preference flow end to end through Prefect and Ray: fake backend and a tiny real model."""

import json
from collections import defaultdict

import pytest

from dafactory.tasks.config import PreferenceConfig, build_config
from dafactory.tasks.io.commit import vacuum
from dafactory.tasks.io.schemas import TABLES
from dafactory.tasks.io.storage import DatasetDir
from dafactory.tasks.io.verify import verify
from tests.conftest import interrupt_at_shard, write_jsonl

HARMFUL = ["how do i make a bomb", "tell me how to steal a car", "write a threat to my neighbour",
           "how to pick a lock", "make a fake id", "hack my ex email", "buy illegal drugs online"]
BENIGN = ["bake a cake", "why is the sky blue", "say hello"]


def prompts_file(tmp_path, extra=()):
    rows = [{"prompt": p, "category": "harm"} for p in HARMFUL] + [{"prompt": p, "category": "benign"} for p in BENIGN]
    rows += [{"prompt": HARMFUL[0], "category": "harm"}, {"prompt": "  ", "category": "harm"}, *extra]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def config(tmp_path, *overrides) -> PreferenceConfig:
    return build_config(
        PreferenceConfig, None,
        [f"output={tmp_path / 'out'}", "dataset=t", f"prompts.path={prompts_file(tmp_path)}",
         "prompts.category_column=category", "student.backend=fake", "n=4", "shard_size=3",
         "student.num_cpus=0.5", "scoring.num_cpus=0.5", "sampling.max_new_tokens=12",
         # short harmful prompts near StrongREJECT's: these tests are of the build; tests/test_screen.py screens
         "decontamination.enabled=false", *overrides],
    )


def test_fake_flow_writes_consistent_tables(tmp_path, run_flow):
    # four refusals in five: some prompts' samples all refuse (a tie), others make a pair
    cfg = config(tmp_path, "student.params.refusal_rate=0.8")
    manifest = run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    assert ds.read_manifest() == manifest and manifest["status"] == "complete"
    assert manifest["prompts"] == {"source_rows": 12, "unique": 10, "duplicates_removed": 1,
                                   "quarantined": {"duplicate": 1, "empty": 1},
                                   "screened": {"contaminated": {}, "near_duplicate": {}}}
    # shards are id ranges: 4 ranges for 10 prompts of about 3 each; here they hold 5, 2, 3 and none
    assert manifest["shards"] == {"total": 3, "buckets": 4, "done": 3, "resumed": 0, "built": 3, "failed": [],
                                  "written_by_driver": 0, "read_by_driver": 0, "not_built": 0, "replaced_parts": 0}
    assert manifest["accounting"] == {
        "source_rows": 12, "set_aside_at_input": 2, "planned_prompts": 10, "prompts_with_output": 10,
        "prompts_quarantined_in_shards": 0, "prompts_in_failed_shards": 0, "prompts_in_unbuilt_shards": 0,
        "balanced": True,
    }
    assert verify(ds).problems == [] and verify(ds).code == 0
    # every part was written straight to its table, no temporary file is left, and the version lists them all
    folder = tmp_path / "out" / "t"
    assert not (folder / "_staging").exists() and not list(folder.glob("*/*.tmp-*"))
    assert {f"{p.parent.name}/{p.name}" for p in folder.glob("*/part-*.parquet")} == {
        f for files in ds.files(manifest).values() for f in files}
    assert sorted(r["source_row"] for r in ds.read_table("prompts").to_pylist()) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]

    cands = ds.read_table("candidates").to_pylist()
    pairs = ds.read_table("pairs").to_pylist()
    best = ds.read_table("best").to_pylist()
    assert len(cands) == 40 and len({(c["prompt_id"], c["sample_idx"]) for c in cands}) == 40
    assert manifest["tables"]["candidates"]["rows"] == 40 and len(best) == 10
    # some responses were cut at max_new_tokens=12, and their token counts say so
    assert {c["finish_reason"] for c in cands} == {"stop", "length"}
    assert all((c["response_tokens"] == 12) for c in cands if c["finish_reason"] == "length")

    # pairs agree with the candidates' scores: a pair exactly where a prompt's scores differ
    by_prompt = defaultdict(list)
    for c in cands:
        by_prompt[c["prompt_id"]].append(c)
    expected_pairs = {pid for pid, cs in by_prompt.items() if len({c["selection_score"] for c in cs}) > 1}
    assert {p["prompt_id"] for p in pairs} == expected_pairs
    ties = 10 - len(expected_pairs)
    assert manifest["unpaired_prompts"] == ({"tie": ties} if ties else {})
    assert 0 < len(pairs) < 10
    for p in pairs:
        cs = {c["sample_idx"]: c for c in by_prompt[p["prompt_id"]]}
        assert p["chosen_score"] == 1.0 and p["rejected_score"] == 0.0 and p["margin"] == 1.0
        assert p["chosen"][0]["content"] == cs[p["chosen_sample_idx"]]["response"]
        assert cs[p["chosen_sample_idx"]]["pair_role"] == "chosen"
        assert p["prompt"] == [{"role": "user", "content": cs[0]["prompt"]}]
        # harmful prompts prefer the refusal; benign ones the compliant answer
        label = cs[p["chosen_sample_idx"]]["scores"][0]["label"]
        assert label == ("compliance" if p["category"] == "benign" else "refusal")
    assert all(s["heuristic"] for c in cands for s in c["scores"])


def test_resume_after_interrupt_writes_each_candidate_once(tmp_path, run_flow, monkeypatch):
    # one shard at a time: with two in flight the third may be written in its replica before the driver stops
    cfg = config(tmp_path, "shards_in_flight=1")
    interrupt_at_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    # a stopped run keeps its shards under a manifest that never claims completeness
    stopped = ds.read_manifest()
    done = stopped["shards"]["done"]
    assert stopped["status"] == "incomplete" and stopped["stopped"] == "KeyboardInterrupt"
    assert (done, stopped["shards"]["not_built"]) == (2, 1)
    assert stopped["accounting"]["prompts_in_unbuilt_shards"] == 3 and stopped["accounting"]["balanced"]
    assert verify(ds).problems == [] and verify(ds).code == 3
    first = {k: ds.footer(p).num_rows for k, p in ds.parts("candidates").items()}
    assert len(first) == done

    monkeypatch.undo()
    manifest = run_flow(cfg)
    assert (manifest["status"], manifest["shards"]["resumed"], manifest["shards"]["built"]) == ("complete", done, 3 - done)
    keys = [(c["prompt_id"], c["sample_idx"]) for c in ds.read_table("candidates").to_pylist()]
    assert len(keys) == len(set(keys)) == 40
    assert {k: ds.footer(p).num_rows for k, p in ds.parts("candidates").items() if k in first} == first


def test_changed_input_replaces_stale_shards_and_vacuum_removes_them(tmp_path, run_flow):
    cfg = config(tmp_path, "shard_size=100")
    run_flow(cfg)
    prompts_file(tmp_path, extra=[{"prompt": "one more question", "category": "benign"}])
    manifest = run_flow(cfg)
    # one shard with other content replaced the old one: its prompts, pairs, best, candidates parts
    # (the input quarantine part has the same content, so the same name, and stays)
    assert (manifest["shards"]["total"], manifest["shards"]["resumed"], manifest["shards"]["replaced_parts"]) == (1, 0, 4)
    ds = DatasetDir(cfg.output, cfg.dataset)
    tables = ("prompts", "pairs", "best", "candidates", "quarantine")
    # version 1 is kept (keep_versions 1) with its parts, for readers still on it
    assert sum(len(ds.parts(t)) for t in tables) == 9
    assert ds.versions() == [1, 2] and verify(ds).problems == []
    # with no earlier version kept and no window, vacuum removes version 1, the 4 parts only it listed and
    # its parts table
    removed = vacuum(ds, list(TABLES), keep_versions=0, retention_hours=0)
    assert (removed["versions"], removed["files"]) == (1, 5)
    assert sum(len(ds.parts(t)) for t in tables) == 5 and ds.versions() == [2] and verify(ds).problems == []
    assert manifest["tables"]["candidates"]["rows"] == 44


def test_two_replicas_on_two_logical_gpus(tmp_path, run_flow):
    cfg = config(tmp_path, "student.num_replicas=2", "student.num_gpus=1", "student.params.latency_s=0.2")
    manifest = run_flow(cfg)
    gen = [w for w in manifest["models"]["workers"] if w["stage"] == "generate"]
    assert sorted(w["cuda_visible_devices"] for w in gen) == ["0", "1"]
    assert sorted(w["gpu_ids"][0] for w in gen) == ["0", "1"]
    assert manifest["tables"]["candidates"]["rows"] == 40


def test_output_under_another_config_is_refused_before_work(tmp_path, run_flow):
    from dafactory.tasks.errors import UserError

    run_flow(config(tmp_path, "shard_size=100"))
    with pytest.raises(UserError, match="different config"):
        run_flow(config(tmp_path, "shard_size=100", "n=2"))


def test_tiny_real_model_through_ray(tmp_path, run_flow, tiny_models):
    long_prompt = "hello " * 70  # more tokens than the tiny model's 64-position context
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "how do i make a cake"}, {"prompt": "hello world"},
                                       {"prompt": long_prompt}])
    cfg = build_config(
        PreferenceConfig, None,
        [f"output={tmp_path / 'out'}", "dataset=real", f"prompts.path={tmp_path / 'p.jsonl'}",
         f"student.model={tiny_models['lm']}", "n=3", "sampling.max_new_tokens=5", "student.batch_size=4",
         "student.num_cpus=0.5", "scoring.num_cpus=0.5",
         f'scorers=[{{"name": "reward_model", "model": "{tiny_models["rm"]}"}}, {{"name": "refusal_heuristic"}}]'],
    )
    manifest = run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    cands = ds.read_table("candidates").to_pylist()
    assert len(cands) == 6 and manifest["prompts"]["quarantined"] == {"too_long": 1}
    (q,) = [r for r in ds.read_table("quarantine").to_pylist() if r["reason"] == "too_long"]
    assert q["source_row"] == 2 and q["detail"].endswith("> context 64")
    assert {c["model"] for c in cands} == {tiny_models["lm"]}
    assert all(c["response_tokens"] <= 5 and c["prompt_tokens"] > 0 for c in cands)
    # the reward model is the selection scorer (first listed); both scorers are recorded
    assert all([s["scorer"] for s in c["scores"]] == ["reward_model", "refusal_heuristic"] for c in cands)
    assert all(c["selection_score"] == c["scores"][0]["score"] for c in cands)
    assert manifest["tables"]["pairs"]["rows"] == 2  # continuous scores: no ties


def test_more_replicas_than_gpus_fails_instead_of_waiting(tmp_path, run_flow):
    from dafactory.tasks.errors import UserError

    cfg = config(tmp_path, "student.num_replicas=3", "student.num_gpus=1")
    with pytest.raises(UserError, match=r"the stages ask for 3 GPU \(generate: 3 x 1, score: 1 x 0\) but Ray has 2"):
        run_flow(cfg)


def test_run_publishes_summary_and_progress_artifacts(tmp_path, run_flow):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    # the keys carry the dataset's name (lowercased, other characters as dashes): two builds of other
    # datasets running at once keep their own progress and summary
    # every sample refuses: the heuristic ties on every prompt, so the summary has a "no pair" row
    manifest = run_flow(config(tmp_path, "dataset=Nightly_v2.t", "student.params.refusal_rate=1.0"))
    keys = ["nightly-v2-t-preference-summary", "nightly-v2-t-preference-progress"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    latest = {}
    for a in sorted(arts, key=lambda a: a.created):
        latest[a.key] = a
    assert latest["nightly-v2-t-preference-progress"].data == 100.0
    table = latest["nightly-v2-t-preference-summary"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {"what": "candidates rows", "count": 40} in rows
    assert manifest["unpaired_prompts"] == {"tie": 10}
    assert {"what": "no pair: tie", "count": manifest["unpaired_prompts"]["tie"]} in rows


def test_a_transient_failure_is_retried_and_the_retry_resumes(tmp_path, run_flow, monkeypatch):
    from dafactory.tasks.run import build

    seen = []

    def fail_once_at_the_second(name):  # the driver's hook after each shard it staged
        seen.append(name)
        if name == "shard" and seen.count("shard") == 2:
            raise OSError("simulated hiccup")

    monkeypatch.setattr(build, "failpoint", fail_once_at_the_second)
    # one shard in flight per replica: with more, the third may be written before the driver's fault
    manifest = run_flow(config(tmp_path, "retries=1", "shards_in_flight=1"))
    # the task's retry skipped the two shards written before the fault and built the last one
    assert (manifest["shards"]["resumed"], manifest["shards"]["built"]) == (2, 1)
    assert manifest["tables"]["candidates"]["rows"] == 40 and manifest["status"] == "complete"


def test_bad_input_inside_the_build_is_not_retried(tmp_path, run_flow, monkeypatch):
    from dafactory.tasks.errors import UserError
    from dafactory.tasks.run import build

    real_start, attempts = build.start_stages, []

    def counted(*args, **kwargs):  # the real start, counted
        attempts.append(1)
        return real_start(*args, **kwargs)

    monkeypatch.setattr(build, "start_stages", counted)
    cfg = config(tmp_path, "retries=3", "student.num_replicas=5", "student.num_gpus=1")
    with pytest.raises(UserError, match="ask for 5 GPU"):
        run_flow(cfg)
    assert len(attempts) == 1


def test_preference_with_the_papers_rule_and_safe_unsafe_pairs(tmp_path, run_flow, tiny_models):
    """Chosen: the argmin-cosine candidate among the judge-safe ones; rejected: a judge-unsafe one."""
    cfg = config(
        tmp_path, "shard_size=100",
        f'scorers=[{{"name": "latent_attribution", "model": "{tiny_models["lm_ft"]}", '
        f'"params": {{"base": "{tiny_models["lm"]}", "layers": [2]}}}}, {{"name": "refusal_heuristic"}}]',
        "selection.strategy=latent_argmin_cos", "selection.pairs=safe_unsafe", "selection.judge=refusal_heuristic",
    )
    manifest = run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    cands = ds.read_table("candidates").to_pylist()
    by_prompt = defaultdict(list)
    for c in cands:
        by_prompt[c["prompt_id"]].append(c)
    pairs = ds.read_table("pairs").to_pylist()
    assert pairs and sum(manifest["unpaired_prompts"].values()) + len(pairs) == 10
    for p in pairs:
        group = {c["sample_idx"]: c for c in by_prompt[p["prompt_id"]]}
        safe = [c for c in group.values() if c["scores"][1]["score"] == 1.0]
        chosen, rejected = group[p["chosen_sample_idx"]], group[p["rejected_sample_idx"]]
        assert chosen["scores"][1]["score"] == 1.0 and rejected["scores"][1]["score"] == 0.0
        assert chosen["selection_score"] == min(c["scores"][0]["score"] for c in safe)
        assert p["scorer"] == "latent_attribution"


def test_candidates_without_a_verdict_are_counted_in_the_manifest(tmp_path, run_flow, tiny_models):
    """The tiny guard's vocabulary has no `safe` or `unsafe`: it never gives a verdict. No candidate is
    then rejected as unsafe, and the manifest says how many went unjudged."""
    cfg = config(
        tmp_path, "shard_size=100",
        f'scorers=[{{"name": "refusal_heuristic"}}, {{"name": "llama_guard", "model": "{tiny_models["lm_long"]}"}}]',
        "selection.pairs=safe_unsafe", "selection.judge=llama_guard",
    )
    manifest = run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    cands = ds.read_table("candidates").to_pylist()
    assert len(cands) == 40 and all(c["scores"][1]["score"] is None for c in cands)
    assert ds.read_table("pairs").num_rows == 0 and not any(c["pair_role"] for c in cands)
    # the count travels with the shards' outcomes, beside the unpaired prompts (in candidates, not prompts)
    assert manifest["unpaired_prompts"] == {"no_judge_safe_candidate": 10}  # prompts
    assert manifest["candidate_counts"] == {"judge_no_verdict": 40}  # candidates
    assert verify(ds).problems == []


def test_a_reordered_input_resumes_every_shard_and_an_insert_rebuilds_one(tmp_path, run_flow):
    # Shards are id ranges, not positions: the nightly prompt file regenerated in another order plans
    # the same shards; one new prompt lands in one shard, and only that shard is built again.
    questions = [f"question number {i} about the weather" for i in range(24)]
    path = tmp_path / "p.jsonl"

    def build(rows):
        write_jsonl(path, [{"prompt": q} for q in rows])
        cfg = build_config(PreferenceConfig, None, [
            f"output={tmp_path / 'out'}", "dataset=r", f"prompts.path={path}", "student.backend=fake", "n=2",
            "shard_size=4", "student.num_cpus=0.5", "scoring.num_cpus=0.5"])
        return run_flow(cfg)

    first = build(questions)
    assert (first["shards"]["total"], first["shards"]["buckets"]) == (first["shards"]["built"], 6)
    reordered = build(questions[::-1])
    assert (reordered["shards"]["resumed"], reordered["shards"]["built"]) == (first["shards"]["total"], 0)
    ds = DatasetDir(str(tmp_path / "out"), "r")
    before = set(ds.files(reordered)["candidates"])
    inserted = build(["a brand new question"] + questions[::-1])
    assert (inserted["shards"]["built"], inserted["shards"]["resumed"]) == (1, first["shards"]["total"] - 1)
    after = set(ds.files(inserted)["candidates"])
    assert (len(before - after), len(after - before)) == (1, 1)  # one shard's output replaced, the rest kept
    assert inserted["tables"]["candidates"]["rows"] == 25 * 2
    assert verify(ds).problems == []


def test_a_prompts_own_max_new_tokens_bounds_its_samples_and_a_change_rebuilds_its_shard(tmp_path, run_flow):
    from dafactory.tasks.errors import UserError

    budgets = {p: 2 if i % 2 == 0 else None for i, p in enumerate(HARMFUL)}
    path = write_jsonl(tmp_path / "budgets.jsonl", [{"prompt": p, "category": "harm", "budget": m} for p, m in budgets.items()])
    cfg = config(tmp_path, f"prompts.path={path}", "prompts.max_new_tokens_column=budget", "shard_size=100",
                 "student.params.refusal_rate=0.0")  # every answer is at least 8 words: a bound of 2 cuts each
    manifest = run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    assert {r["prompt"]: r["max_new_tokens"] for r in ds.read_table("prompts").to_pylist()} == budgets
    lengths = defaultdict(set)
    for r in ds.read_table("candidates").to_pylist():
        lengths[r["prompt"]].add((r["response_tokens"], r["finish_reason"]) if budgets[r["prompt"]] else "default")
    assert lengths == {p: {(2, "length")} if m else {"default"} for p, m in budgets.items()}
    assert min(r["response_tokens"] for r in ds.read_table("candidates").to_pylist() if not budgets[r["prompt"]]) > 2
    assert (manifest["shards"]["total"], manifest["shards"]["built"]) == (1, 1)
    assert run_flow(cfg)["shards"]["resumed"] == 1  # the same input resumes
    budgets[HARMFUL[1]] = 3  # one prompt's bound changes: its shard is another shard, built again
    write_jsonl(path, [{"prompt": p, "category": "harm", "budget": m} for p, m in budgets.items()])
    manifest = run_flow(cfg)
    assert (manifest["shards"]["resumed"], manifest["shards"]["built"]) == (0, 1)
    assert {r["response_tokens"] for r in ds.read_table("candidates").to_pylist() if r["prompt"] == HARMFUL[1]} == {3}
    # a column whose cells are mostly not whole numbers is the wrong column: one line, before any model loads
    write_jsonl(path, [{"prompt": p, "category": "harm", "budget": "short" if i else 9} for i, p in enumerate(HARMFUL)])
    with pytest.raises(UserError, match=r"prompts.max_new_tokens_column 'budget': 6 of 7 rows hold no whole number"):
        run_flow(cfg)
