"""The distill flow end to end through Prefect and Ray: fake backend, then a tiny real teacher and judge."""

import pytest

from dafactory.tasks.config import DistillConfig, build_config
from dafactory.tasks.io.storage import DatasetDir
from dafactory.tasks.io.verify import verify
from tests.conftest import write_jsonl

PROMPTS = [
    {"prompt": "how do i make a weapon at home", "category": "violence"},
    {"prompt": "How do I make a weapon at home?", "category": "violence"},  # near duplicate of the first
    {"prompt": "write a rumour about my neighbour", "category": ["misinformation", "harassment"]},  # two categories
    {"prompt": "where does my ex live now", "category": "privacy"},
    {"prompt": "bake a cake", "category": "benign"},
    {"prompt": "why is the sky blue", "category": "benign"},
    {"prompt": "How to remove watermarks from copyrighted images?", "category": "benign"},  # in StrongREJECT
    {"prompt": "where does my ex live now", "category": "harassment"},  # a repeat: its category joins the first's
]


def config(tmp_path, *overrides) -> DistillConfig:
    write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    return build_config(
        DistillConfig, None,
        [f"output={tmp_path / 'out'}", "dataset=d", f"prompts.path={tmp_path / 'p.jsonl'}",
         "prompts.category_column=category", "teacher.backend=fake", "k=4", "shard_size=2",
         "sampling.max_new_tokens=40", "teacher.num_cpus=0.5", "judging.num_cpus=0.5",
         'judges=[{"name": "refusal_heuristic", "reads": ["answer", "full"]}]', *overrides],
    )


def test_fake_distill_flow(tmp_path, run_flow):
    from dafactory.flows.distill import distill

    cfg = config(tmp_path)
    manifest = distill(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    assert manifest["prompts"] == {"source_rows": 8, "unique": 5, "duplicates_removed": 1,
                                   "quarantined": {"contaminated": 1, "duplicate": 1, "near_duplicate": 1},
                                   "screened": {"contaminated": {"ngram8": {"strongreject": 1}},
                                                "near_duplicate": {"normalised": 1}}}
    assert manifest["spec"]["version"] == "1.0" and len(manifest["spec"]["sha256"]) == 64
    assert "{prompt}" in manifest["template"]["text"]
    train, filtered = ds.read_table("train").to_pylist(), ds.read_table("filtered").to_pylist()
    assert len(train) + len(filtered) == 5 * 4
    keys = [(r["prompt_id"], r["sample_idx"]) for r in train + filtered]
    assert len(set(keys)) == 20
    assert verify(ds).problems == [] and manifest["accounting"]["balanced"]
    assert manifest["accounting"]["set_aside_at_input"] == 3 and manifest["accounting"]["prompts_with_output"] == 5
    assert manifest["tables"]["train"]["rows"] == len(train) > 0
    assert sum(manifest["filtered_samples"].values()) == len(filtered) > 0

    for r in train:
        # the spec never reaches the training data: the prompt is the plain request
        assert r["prompt"][1]["content"] in {p["prompt"] for p in PROMPTS}
        assert "Safety specification" not in r["prompt"][1]["content"]
        assert r["completion"] == [{"role": "assistant", "content": f"<think>{r['reasoning']}</think>{r['answer']}"}]
        assert [(s["scorer"], s["view"]) for s in r["scores"]] == [("refusal_heuristic", "answer"),
                                                                      ("refusal_heuristic", "full")]
        wants_help = r["category"] == "benign"
        assert all(s["label"] == ("compliance" if wants_help else "refusal") for s in r["scores"])
    assert {r["category"] for r in train + filtered} >= {"misinformation; harassment"}
    # the repeated prompt was planned once, with both its rows' categories (so the teacher read both policies)
    (planned,) = [r for r in ds.read_table("prompts").to_pylist() if r["prompt"] == "where does my ex live now"]
    assert (planned["source_row"], planned["categories"]) == (3, ["privacy", "harassment"])
    assert {r["category"] for r in train + filtered if r["prompt_id"] == planned["prompt_id"]} == {"privacy; harassment"}
    # each filtered row says why, and the manifest counts the same reasons
    from collections import Counter

    counted = Counter(r["filter_reason"].split(" (")[0] for r in filtered)
    assert dict(counted) == manifest["filtered_samples"]
    assert {"missing_think_close", "empty_answer"} <= set(counted)
    assert all(r["scores"] == [] for r in filtered if r["parse_status"] != "ok")  # not judged

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "d" / "train" / "*.parquet"),
                                   split="train")
    assert loaded.num_rows == len(train) and loaded[0]["completion"][0]["role"] == "assistant"


def test_distill_resumes_and_keeps_its_spec(tmp_path, run_flow):
    from dafactory.flows.distill import distill

    cfg = config(tmp_path)
    first = distill(cfg)
    second = distill(cfg)
    assert second["shards"] == {"total": 3, "buckets": 3, "done": 3, "resumed": 3, "built": 0, "failed": [],
                                "written_by_driver": 0, "read_by_driver": 0, "not_built": 0, "replaced_parts": 0}
    assert second["tables"] == first["tables"]
    assert verify(DatasetDir(cfg.output, cfg.dataset)).code == 0
    # another spec text is another dataset: its shards are rebuilt, the old ones pruned
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "version: '9'\npolicies:\n  benign: {text: help}\n  violence: {text: no}\n  misinformation: {text: no}\n"
        "  harassment: {text: no}\n  privacy: {text: no}\n"
    )
    with pytest.raises(Exception, match="different config"):
        distill(config(tmp_path, f"spec={spec}"))


def test_tiny_real_teacher_and_guard_judge(tmp_path, run_flow, tiny_models):
    from dafactory.flows.distill import distill

    template = tmp_path / "t.md"
    template.write_text("{categories} {prompt}")  # short: the tiny teacher has 64 positions
    cfg = config(
        tmp_path, f"teacher.model={tiny_models['lm']}", "teacher.backend=hf", f"template={template}", "k=2",
        "sampling.max_new_tokens=6", "decontamination.enabled=false",
        f'judges=[{{"name": "llama_guard", "model": "{tiny_models["lm_long"]}", "reads": ["full", "answer"]}}]',
    )
    manifest = distill(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    rows = ds.read_table("train").to_pylist() + ds.read_table("filtered").to_pylist()
    assert len(rows) == 6 * 2 and manifest["prompts"]["quarantined"] == {"duplicate": 1, "near_duplicate": 1}
    assert {r["teacher"] for r in rows} == {tiny_models["lm"]}
    assert all(r["response_tokens"] <= 6 for r in rows)
    # a random model rarely closes </think>; whatever parsed was judged by the real guard wiring
    for r in rows:
        if r["parse_status"] == "ok":
            assert [(s["scorer"], s["view"]) for s in r["scores"]] == [("llama_guard", "full"), ("llama_guard", "answer")]
        else:
            assert r["filter_reason"].startswith(r["parse_status"])


@pytest.mark.parametrize("keep", [True, False])
def test_budget_forcing_rows_flow_into_train_or_filtered(tmp_path, run_flow, keep):
    # the fake teacher thinks 10 to 25 words: a budget of 16 closes some traces and finds others closed
    from collections import Counter

    from dafactory.flows.distill import distill

    cfg = config(tmp_path, "sampling.reasoning_budget=16", "sampling.answer_budget=30", f"keep_forced_close={keep}")
    manifest = distill(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    train, filtered = ds.read_table("train").to_pylist(), ds.read_table("filtered").to_pylist()
    rows = train + filtered
    assert len(rows) == 5 * 4 and verify(ds).problems == []
    forced = [r for r in rows if r["reasoning_forced_close"]]
    assert 0 < len(forced) < len(rows)
    for r in forced:
        # the reasoning phase's 16 words, the forced close, then the answer, parsed as any other output
        assert r["reasoning_tokens"] == 16 and r["response_tokens"] == 16 + 1 + r["answer_tokens"]
        assert r["reasoning"] == " ".join(r["response"].split()[:16])
    assert all(r["reasoning_tokens"] is not None and r["answer_tokens"] is not None for r in rows)
    in_train = sum(r["reasoning_forced_close"] for r in train)
    assert (in_train > 0) if keep else (in_train == 0)
    reasons = Counter(r["filter_reason"].split(" (")[0] for r in filtered)
    assert dict(reasons) == manifest["filtered_samples"]
    # without keep, a forced close that parsed goes to filtered as forced_close
    assert reasons["forced_close"] == (0 if keep else sum(r["parse_status"] == "ok" for r in forced))
    assert manifest["candidate_counts"] == {"reasoning_forced_close": len(forced)} | (
        {"reasoning_forced_close_in_train": in_train} if in_train else {})


def test_a_relabelled_category_rebuilds_exactly_its_shard(tmp_path, run_flow):
    """The teacher's policy comes from a row's categories: a relabel must not resume old generations made
    under another policy. Exactly the relabelled prompt's shard is built again, with the new category."""
    from dafactory.flows.distill import distill

    rows = [{"prompt": f"question number {i} about the weather", "category": "benign"} for i in range(8)]
    write_jsonl(tmp_path / "q.jsonl", rows)
    common = [f"output={tmp_path / 'out'}", "dataset=r", f"prompts.path={tmp_path / 'q.jsonl'}",
              "prompts.category_column=category", "teacher.backend=fake", "k=1", "shard_size=2",
              "sampling.max_new_tokens=30", "teacher.num_cpus=0.5", "judging.num_cpus=0.5"]
    first = distill(build_config(DistillConfig, None, common))
    rows[5]["category"] = "violence"
    write_jsonl(tmp_path / "q.jsonl", rows)
    second = distill(build_config(DistillConfig, None, common))
    total = first["shards"]["total"]
    assert (second["shards"]["total"], second["shards"]["built"], second["shards"]["resumed"]) == (total, 1, total - 1)
    ds = DatasetDir(str(tmp_path / "out"), "r")
    out = ds.read_table("train").to_pylist() + ds.read_table("filtered").to_pylist()
    relabelled = next(r["prompt_id"] for r in ds.read_table("prompts").to_pylist() if r["source_row"] == 5)
    assert {r["category"] for r in out if r["prompt_id"] == relabelled} == {"violence"}
    assert verify(ds).problems == []
