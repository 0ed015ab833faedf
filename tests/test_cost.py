"""What a build cost: per-stage tokens, throughput and resource-seconds in the manifest, priced by config."""

import pytest

from dafactory.tasks.config import PreferenceConfig, build_config
from dafactory.tasks.errors import UserError
from dafactory.tasks.io.manifest import build_cost, summary_rows
from dafactory.tasks.io.storage import DatasetDir
from tests.conftest import interrupt_at_shard
from tests.test_flow import config

STAGES = [{"name": "generate", "replicas": 2, "num_cpus": 1.5, "num_gpus": 1.0},
          {"name": "score", "replicas": 1, "num_cpus": 0.5, "num_gpus": 0.0}]


def stats(shard_id, gen_busy, samples, prompt_tokens, generated, score_busy):
    return {"shard_id": shard_id, "work": {
        "generate": {"busy_s": gen_busy, "samples": samples, "prompt_tokens": prompt_tokens,
                     "generated_tokens": generated},
        "score": {"busy_s": score_busy, "samples": samples}}}


A = stats("a", 3.0, 8, 40, 100, 0.5)  # built by an earlier run (its stats from the footer)
B = stats("b", 5.0, 12, 60, 150, 0.25)  # built by this run
OLD = {"shard_id": "o"}  # built before shards recorded their work: counted in no total


def test_occupancy_counts_a_calls_running_sequences_step_by_step():
    """generation.occupancy against a step-by-step count: limit 4, sequences of 1, 2, 4 and 4 tokens over 8 s:
    4, 3, 2, 2 running at steps 0-3, so 3 of 4 steps (6 s) below 3.6; 11 of 16 sequence-steps used."""
    from collections import Counter

    from dafactory.tasks.generate.generation import occupancy

    c = Counter()
    occupancy(c, 8.0, [4, 1, 4, 2], 4)
    assert c == {"engine_s": 8.0, "below_s": 6.0, "slot_steps": 11, "slot_capacity": 16}
    occupancy(c, 2.0, [], 4)  # every sequence failed: below all along, no steps
    occupancy(c, 1.0, [3, 3, 3, 3], 4)  # full all along
    assert c == {"engine_s": 11.0, "below_s": 8.0, "slot_steps": 23, "slot_capacity": 28}


@pytest.mark.parametrize("report, shard_stats, prices, expected", [
    # this run built B with the replicas held 10 s (its stream took 9.5 s); A was resumed; no prices
    ({"stages": STAGES, "stats": {"b": B}, "held_s": 10.0, "seconds": {"build_wall": 9.5}}, [A, B], None, {
        "prices": {"per_gpu_hour": None, "per_cpu_hour": None}, "prompt_tokens": "once per prompt",
        "wall_s": 9.5, "held_s": 10.0, "samples_per_s": round(12 / 9.5, 3), "tokens_per_s": round(150 / 9.5, 3),
        "stages": {
            "generate": {"replicas": 2, "num_cpus": 1.5, "num_gpus": 1.0, "shards": 2, "samples": 20, "busy_s": 8.0,
                         "prompt_tokens": 100, "generated_tokens": 250, "this_run": {
                             "shards": 1, "samples": 12, "busy_s": 5.0, "prompt_tokens": 60, "generated_tokens": 150,
                             "samples_per_s": 2.4, "tokens_per_s": 30.0, "held_s": 10.0, "busy_share": 0.25,
                             "cpu_s": 30.0, "gpu_s": 20.0, "cost": None}},
            "score": {"replicas": 1, "num_cpus": 0.5, "num_gpus": 0.0, "shards": 2, "samples": 20, "busy_s": 0.75,
                      "this_run": {"shards": 1, "samples": 12, "busy_s": 0.25, "samples_per_s": 48.0,
                                   "held_s": 10.0, "busy_share": 0.025, "cpu_s": 5.0, "gpu_s": 0.0, "cost": None}},
        },
        "total": {"cpu_s": 35.0, "gpu_s": 20.0, "cost": None},
    }),
    # every shard resumed (no replica started): the dataset's work, no resource-seconds; a GPU price only,
    # so CPUs cost nothing; a shard from before work was recorded adds to no total
    ({"stages": STAGES, "stats": {}, "held_s": 0.0, "seconds": {}}, [A, OLD], {"per_gpu_hour": 3.0}, {
        "prices": {"per_gpu_hour": 3.0, "per_cpu_hour": None}, "prompt_tokens": "once per prompt",
        "wall_s": 0.0, "held_s": 0.0, "samples_per_s": None, "tokens_per_s": None,
        "stages": {
            "generate": {"replicas": 2, "num_cpus": 1.5, "num_gpus": 1.0, "shards": 1, "samples": 8, "busy_s": 3.0,
                         "prompt_tokens": 40, "generated_tokens": 100, "this_run": {
                             "shards": 0, "samples": 0, "busy_s": 0.0, "prompt_tokens": 0, "generated_tokens": 0,
                             "samples_per_s": None, "tokens_per_s": None, "held_s": 0.0, "busy_share": None,
                             "cpu_s": 0.0, "gpu_s": 0.0, "cost": 0.0}},
            "score": {"replicas": 1, "num_cpus": 0.5, "num_gpus": 0.0, "shards": 1, "samples": 8, "busy_s": 0.5,
                      "this_run": {"shards": 0, "samples": 0, "busy_s": 0.0, "samples_per_s": None, "held_s": 0.0,
                                   "busy_share": None, "cpu_s": 0.0, "gpu_s": 0.0, "cost": 0.0}},
        },
        "total": {"cpu_s": 0.0, "gpu_s": 0.0, "cost": 0.0},
    }),
])
def test_cost_from_stats_and_held_time(report, shard_stats, prices, expected):
    assert build_cost(report, shard_stats, prices) == expected


def test_priced_cost_is_resource_seconds_times_price_per_hour():
    report = {"stages": STAGES, "stats": {"b": B}, "held_s": 10.0, "seconds": {"build_wall": 9.5}}
    cost = build_cost(report, [B], {"per_gpu_hour": 2.5, "per_cpu_hour": 0.04})
    # by hand: generate holds 2 x 1.5 CPUs x 10 s = 30 CPU-s (0.008333 CPU-hours at 0.04: 0.000333) and
    # 2 x 1 GPU x 10 s = 20 GPU-s (0.005556 GPU-hours at 2.5: 0.013889), 0.014222 in all; score 5 CPU-s
    # (0.001389 CPU-hours: 0.0000556)
    assert cost["stages"]["generate"]["this_run"]["cost"] == pytest.approx(0.0142222, abs=1e-7)
    assert cost["stages"]["score"]["this_run"]["cost"] == pytest.approx(0.0000556, abs=1e-7)
    assert cost["total"]["cost"] == pytest.approx(0.0142778, abs=1e-7)


def test_prices_are_runtime_settings_and_checked():
    plain = build_config(PreferenceConfig, None, [])
    priced = build_config(PreferenceConfig, None, ["cost.per_gpu_hour=2.5", "cost.per_cpu_hour=0.04"])
    assert plain.fingerprint() == priced.fingerprint()  # a price changes no row: same dataset, same folder
    assert priced.cost.per_gpu_hour == 2.5 and plain.cost.per_cpu_hour is None
    # cases: (override, the one line it fails with)
    for override, line in [
        ("cost.per_gpu_hour=-1", "invalid config: cost.per_gpu_hour: Input should be greater than or equal to 0"),
        ("cost.per_tpu_hour=1", "invalid config: cost.per_tpu_hour: Extra inputs are not permitted"),
    ]:
        with pytest.raises(UserError) as err:
            build_config(PreferenceConfig, None, [override])
        assert str(err.value) == line


def dataset_work(cands: list[dict]) -> dict:
    """Samples and tokens of candidate rows, recomputed: each prompt's tokens once, every sample's tokens."""
    per_prompt = {c["prompt_id"]: c["prompt_tokens"] for c in cands}
    return {"samples": len(cands), "prompt_tokens": sum(per_prompt.values()),
            "generated_tokens": sum(c["response_tokens"] for c in cands)}


def test_resource_seconds_match_the_busy_time_of_a_saturated_stage(tmp_path, run_flow, capsys):
    # One replica of the generate stage on a (logical) GPU, sleeping 0.5 s per call: it is the bottleneck,
    # busy from the first shard to the last. 10 prompts x 4 samples in batches of 4 over shards of 5, 2
    # and 3 prompts: 5 + 2 + 3 = 10 calls.
    cfg = config(tmp_path, "student.num_gpus=1", "student.batch_size=4", "student.params.latency_s=0.5",
                 "cost.per_gpu_hour=2.5", "cost.per_cpu_hour=0.04")
    manifest = run_flow(cfg)
    cost = manifest["cost"]
    gen, score = cost["stages"]["generate"], cost["stages"]["score"]
    held = cost["held_s"]
    busy = gen["this_run"]["busy_s"]
    assert busy >= 10 * 0.5 and busy <= held
    # resource-seconds: replicas x resources x held; within 10% of replicas x resources x busy time
    assert gen["this_run"]["gpu_s"] == pytest.approx(1 * 1.0 * busy, rel=0.10)
    assert gen["this_run"]["cpu_s"] == pytest.approx(1 * 0.5 * busy, rel=0.10)
    assert gen["this_run"]["busy_share"] == pytest.approx(1.0, abs=0.10)
    assert gen["this_run"]["gpu_s"] == round(1 * 1.0 * held, 3) and score["this_run"]["cpu_s"] == round(0.5 * held, 3)
    assert (score["this_run"]["gpu_s"], score["num_cpus"], score["replicas"]) == (0.0, 0.5, 1)
    assert cost["wall_s"] <= held

    # tokens and samples, exactly as the written candidates hold them
    work = dataset_work(DatasetDir(cfg.output, cfg.dataset).read_table("candidates").to_pylist())
    assert work["samples"] == 40
    assert {k: gen[k] for k in work} == work and {k: gen["this_run"][k] for k in work} == work
    assert score["samples"] == score["this_run"]["samples"] == 40 and "generated_tokens" not in score
    assert gen["this_run"]["tokens_per_s"] == round(work["generated_tokens"] / busy, 3)
    assert cost["samples_per_s"] == round(40 / cost["wall_s"], 3)

    # occupancy, from the written rows: each generate call is one batch seed; its 4 sequences run until the
    # longest ends, fewer than 90% of 4 of them from the shortest's end on
    calls = {}
    for r in DatasetDir(cfg.output, cfg.dataset).read_table("candidates").to_pylist():
        calls.setdefault((r["shard_id"], r["seed"]), []).append(r["response_tokens"])
    assert sorted(map(len, calls.values())) == [4] * 10
    occ = gen["this_run"]["occupancy"]
    assert occ["slot_use"] == round(sum(map(sum, calls.values())) / sum(4 * max(c) for c in calls.values()), 3)
    below = sum((max(c) - min(c)) / max(c) for c in calls.values()) * 0.5  # 0.5 s a call
    assert occ["below_90pct_share"] == pytest.approx((below + occ["idle_s"]) / held, rel=0.1)
    assert occ["engine_s"] == pytest.approx(10 * 0.5, rel=0.1) and occ["idle_s"] == round(held - occ["engine_s"], 3)

    # cost by hand, per second held: generate holds 1 GPU (2.5/h) and 0.5 CPU (0.04/h): 2.52/h = 0.0007/s;
    # score 0.5 CPU: 0.02/h = 0.00000556/s
    g, s = gen["this_run"], score["this_run"]
    assert g["cost"] == pytest.approx(0.0007 * held, rel=1e-3)
    assert s["cost"] == pytest.approx(0.0000055556 * held, rel=1e-3)
    total = {"cpu_s": round(g["cpu_s"] + s["cpu_s"], 3), "gpu_s": g["gpu_s"], "cost": g["cost"] + s["cost"]}
    assert cost["total"] == total

    # the summary artifact's rows and `dafactory inspect` show them
    rows = {r["what"]: r["count"] for r in summary_rows(manifest)}
    assert rows["generate: generated tokens"] == work["generated_tokens"]
    assert rows["generate: GPU-seconds (this run)"] == g["gpu_s"]
    assert rows["estimated cost (this run)"] == round(cost["total"]["cost"], 6)
    from dafactory.flows.cli import main

    capsys.readouterr()
    assert main(["inspect", f"{cfg.output}/{cfg.dataset}"]) == 0
    out = capsys.readouterr().out
    assert "prices: 2.5 per gpu-hour, 0.04 per cpu-hour" in out
    line = next(x.split() for x in out.splitlines() if x.strip().startswith("generate "))
    assert line[:6] == ["generate", "1", "x", "0.5C/1G", "40", f"{work['prompt_tokens']:,}"]
    assert line[-1] == f"{g['cost']:,.4f}"


def test_a_resumed_build_reports_the_whole_dataset_and_this_runs_resources(tmp_path, run_flow, monkeypatch):
    cfg = config(tmp_path, "shards_in_flight=1")  # with more, a third shard may be written as the stop lands
    interrupt_at_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    first = {name.split("@")[0] for name in ds.parts("candidates")}  # the shard ids written
    stopped = ds.read_manifest()["cost"]["stages"]["generate"]
    cands = ds.read_table("candidates").to_pylist()
    assert {k: stopped[k] for k in ("samples", "prompt_tokens", "generated_tokens")} == dataset_work(cands)
    assert stopped["shards"] == stopped["this_run"]["shards"] == 2

    monkeypatch.undo()
    manifest = run_flow(cfg)
    gen = manifest["cost"]["stages"]["generate"]
    cands = ds.read_table("candidates").to_pylist()
    # the totals: every shard's (the resumed ones' from their footers); this run: the shard it built
    assert {k: gen[k] for k in ("samples", "prompt_tokens", "generated_tokens")} == dataset_work(cands)
    assert gen["samples"] == 40 and gen["shards"] == 3
    this_run = [c for c in cands if c["shard_id"] not in first]
    assert {k: gen["this_run"][k] for k in ("samples", "prompt_tokens", "generated_tokens")} == dataset_work(this_run)
    assert gen["this_run"]["shards"] == 1 and gen["busy_s"] >= gen["this_run"]["busy_s"]
    held = manifest["cost"]["held_s"]
    assert held > 0 and gen["this_run"]["cpu_s"] == round(0.5 * held, 3)  # this run's replicas only
