"""Nothing lost, nothing duplicated: `verify` catches tampering, and runs survive killed workers, a killed
or stopped flow process and a failing shard, with every input row accounted for."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dafactory.flows.cli import main
from dafactory.tasks.config import PreferenceConfig, build_config
from dafactory.tasks.io.storage import DatasetDir
from dafactory.tasks.io.verify import verify
from tests.conftest import cli, output, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def prompts(tmp_path, n=16):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question number {i}"} for i in range(n)]
                       + [{"prompt": "question number 0"}, {"prompt": ""}])


def config(tmp_path, *overrides) -> PreferenceConfig:
    return build_config(PreferenceConfig, None, [
        f"output={tmp_path / 'out'}", "dataset=f", f"prompts.path={prompts(tmp_path)}", "student.backend=fake",
        "n=2", "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5", *overrides,
    ])


@pytest.fixture
def built(tmp_path, run_flow):
    cfg = config(tmp_path)
    run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    assert verify(ds).problems == [] and verify(ds).code == 0
    return ds


def rewrite(path: str, edit) -> None:
    table = pq.read_table(path)
    pq.write_table(edit(table), path)


def test_verify_recomputes_the_accounting(built, capsys):
    assert main(["verify", built.uri]) == 0
    out = capsys.readouterr().out
    assert (f"{built.uri}: 18 source rows = 2 set aside at input + 16 planned; planned = 16 with output "
            "+ 0 quarantined in shards + 0 in failed shards + 0 in shards not built") in out
    assert out.strip().endswith("verify: ok (0 problems, status complete)")


def test_verify_catches_a_lost_row(built, capsys):
    (path, *_) = built.listed_files("candidates")
    shard = Path(path).stem[len("part-"):].split("@")[0]  # the shard id, without the write's token
    first = pq.read_table(path).column("prompt_id")[0].as_py()
    rewrite(path, lambda t: t.filter(pa.array([p != first for p in t.column("prompt_id").to_pylist()])))
    assert main(["verify", built.uri]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH candidates: the manifest says 32 rows, the files hold 30" in out
    assert f"MISMATCH shard {shard}: prompts missing (no output, no quarantine): 1" in out
    assert "prompts_with_output = 16, the files say 15" in out


def test_verify_catches_a_duplicated_row(built, capsys):
    (path, *_) = built.listed_files("candidates")
    rewrite(path, lambda t: pa.concat_tables([t, t.slice(0, 1)]))
    assert main(["verify", built.uri]) == 1
    assert "(prompt_id, sample_idx) written twice: 1" in capsys.readouterr().out


def test_verify_catches_a_missing_source_row(built, capsys):
    path = built.listed_files("prompts")[0]
    rewrite(path, lambda t: t.slice(1))
    assert main(["verify", built.uri]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH source rows missing (neither planned nor set aside): 1 (" in out
    assert "rows for prompts not planned in it: 1" in out


def test_a_killed_worker_is_replaced_and_its_shard_retried(tmp_path, run_flow):
    pid_file = tmp_path / "pids"
    # three shards in flight on each replica: the kill takes all a replica holds, each built again once
    cfg = config(tmp_path, f"student.params.pid_file={pid_file}", "student.params.latency_s=0.3", "shard_retries=2",
                 "shards_in_flight=3")
    ds = DatasetDir(cfg.output, cfg.dataset)
    killed = []

    def killer():  # kill both stages' workers once the first shard is written, mid-way through the run
        import psutil

        while not ds.parts("candidates"):
            time.sleep(0.05)
        pid = int(pid_file.read_text().split()[0])
        # the scoring replica's worker: Ray titles it after its actor class
        (scorer,) = [p.pid for p in psutil.process_iter(["cmdline"])
                     if (p.info["cmdline"] or [""])[0].startswith("ray::ScoreSelectStage")]
        os.kill(pid, signal.SIGKILL)
        os.kill(scorer, signal.SIGKILL)
        killed.append((pid, scorer))

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    manifest = run_flow(cfg)
    t.join(5)
    pids = [int(p) for p in pid_file.read_text().split()]
    assert killed and len(pids) == 2 and pids[0] == killed[0][0]  # Ray restarted the actor in a new process
    assert manifest["status"] == "complete" and manifest["shards"]["failed"] == []
    # the restarted replicas came back with their shard reader and writer (part of their construction):
    # the driver neither read nor wrote any shard for them
    assert (manifest["shards"]["read_by_driver"], manifest["shards"]["written_by_driver"]) == (0, 0)
    assert manifest["tables"]["candidates"]["rows"] == 32
    assert verify(ds).problems == []
    assert len(ds.parts("candidates")) == 8  # a killed try writes nothing, and no shard was written twice


@pytest.mark.parametrize("engine", ["a call at a time", "streaming"])
def test_shards_overlap_in_a_replica_and_give_the_rows_they_give_alone(tmp_path, run_flow, engine):
    """With shards_in_flight=3 a replica holds the next shards while its model works on one (their spans, as
    the replica saw them, overlap); every table equals the one-shard-at-a-time build's, row for row. A streaming
    engine (the fake backend's simulated continuous batching: tasks/generate/feed.py) takes the shards' requests
    together, and its steps are counted in the manifest's occupancy."""
    tables, model = {}, "student.params.step_s=0.002" if engine == "streaming" else "student.params.latency_s=0.1"
    for k in (3, 1):
        cfg = config(tmp_path, f"dataset=k{k}", f"shards_in_flight={k}", model)  # the params are in the seeds
        manifest = run_flow(cfg)
        assert manifest["status"] == "complete"
        ds = DatasetDir(cfg.output, cfg.dataset)
        tables[k] = {t: sorted(map(str, ds.read_table(t).to_pylist())) for t in ("candidates", "pairs", "best")}
        stats = ds.marker_stats(list(ds.parts("candidates").values()))  # the marker parts carry the shard stats
        spans = sorted(tuple(st["spans"]["generate"]) for st in stats)
        overlaps = sum(a[0] == b[0] and b[1] < a[2] for a, b in zip(spans, spans[1:]))
        assert len(spans) == 8 and (overlaps > 0 if k == 3 else overlaps == 0), spans
        steps = sum(st["work"]["generate"].get("steps", 0) for st in stats)
        assert (steps > 0) == (engine == "streaming")
    assert tables[3] == tables[1]


def test_a_shard_that_keeps_failing_is_listed_and_the_rest_go_on(tmp_path, run_flow):
    from dafactory.tasks.run.build import ShardsFailed

    # a prompt that kills the worker process every time (as a segfault or a fatal CUDA error would)
    cfg = config(tmp_path, "student.params.exit_on=number 5", "shard_retries=1")
    with pytest.raises(ShardsFailed, match="1 of 8 shards failed after retries"):
        run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    manifest = ds.read_manifest()
    (failed,) = manifest["shards"]["failed"]
    # "question number 5" falls in the first of 8 id ranges, with 3 other prompts
    assert manifest["status"] == "incomplete" and failed["prompts"] == 4
    assert failed["error"].split(":")[0] in ("ActorDiedError", "ActorUnavailableError", "RayActorError")
    assert manifest["accounting"]["prompts_in_failed_shards"] == 4
    assert manifest["accounting"]["prompts_with_output"] == 12 and manifest["accounting"]["balanced"]
    assert verify(ds).problems == [] and verify(ds).code == 3


def wait_for_parts(ds: DatasetDir, proc: subprocess.Popen, n: int, timeout_s: float = 240) -> None:
    t0 = time.time()
    while len(ds.parts("candidates")) < n:
        assert proc.poll() is None, output(Path(ds.uri).parents[1])
        if time.time() - t0 > timeout_s:
            proc.kill()
            pytest.fail(output(Path(ds.uri).parents[1])[-3000:])
        time.sleep(0.05)


@pytest.mark.server
def test_sigkill_mid_run_then_rerun_recomputes_only_shards_in_flight(tmp_path):
    cfg = config(tmp_path, "student.params.latency_s=1.0")
    ds = DatasetDir(cfg.output, cfg.dataset)
    proc = cli(tmp_path, cfg)
    wait_for_parts(ds, proc, 3)
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:  # the flow process and everything it started, Ray included: no chance to clean up
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    # Count what is written once nothing more lands (a write in flight at the kill either landed whole
    # or not at all).
    done_before, t0 = set(ds.parts("candidates")), time.time()
    while time.time() - t0 < 30:
        time.sleep(3)
        now = set(ds.parts("candidates"))
        if now == done_before:
            break
        done_before = now
    assert 3 <= len(done_before) < 8 and ds.read_manifest() is None

    proc = cli(tmp_path, cfg)
    assert proc.wait(timeout=300) == 0, output(tmp_path)
    manifest = ds.read_manifest()
    assert manifest["status"] == "complete"
    assert manifest["shards"]["resumed"] == len(done_before)  # what was written survived the kill
    assert manifest["shards"]["built"] == 8 - len(done_before)  # only shards not written are computed again
    assert verify(ds).problems == []


@pytest.mark.server
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_graceful_stop_keeps_finished_shards_under_an_incomplete_manifest(tmp_path, sig):
    cfg = config(tmp_path, "student.params.latency_s=1.0")
    ds = DatasetDir(cfg.output, cfg.dataset)
    proc = cli(tmp_path, cfg)
    wait_for_parts(ds, proc, 2)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    assert code in (130, 143, -sig), output(tmp_path)
    manifest = ds.read_manifest()
    assert manifest["status"] == "incomplete" and manifest["stopped"], output(tmp_path)
    kept = manifest["shards"]["done"]
    assert 2 <= kept < 8 and manifest["shards"]["not_built"] == 8 - kept
    assert verify(ds).code == 3 and verify(ds).problems == []
    shown = subprocess.run([sys.executable, "-m", "dafactory.flows.cli", "inspect", ds.uri], cwd=ROOT, capture_output=True,
                           text=True)
    assert f"INCOMPLETE: {kept} of 8 shards done, 0 failed, {8 - kept} not built" in shown.stdout


def test_one_bad_prompt_is_quarantined_and_never_fails_its_batch(tmp_path, run_flow):
    # the backend raises on any batch holding "number 5" (a tokenizer error, an OOM on one long row);
    # shards hold 2 prompts, so one bad prompt is half of its shard: under max_error_rate 0.05 that is not
    # surely a systematic fault (1 of 2: Wilson lower bound 0.029), nor is 1 of the run's 16
    cfg = config(tmp_path, "student.params.fail_on=number 5", "student.batch_size=4")
    manifest = run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    (bad,) = [q for q in ds.read_table("quarantine").to_pylist() if q["reason"] == "generation_error"]
    assert bad["prompt"] == "question number 5"
    assert bad["detail"] == "RuntimeError: injected failure on a prompt containing number 5"
    assert manifest["status"] == "complete" and manifest["tables"]["candidates"]["rows"] == 15 * 2
    assert manifest["accounting"]["prompts_quarantined_in_shards"] == 1 and manifest["accounting"]["balanced"]
    assert manifest["errors"] == {"generation_error": {"RuntimeError": 1}} and manifest["error_rate"] is None
    assert verify(ds).problems == []

    # Re-run: the complete version holds the shard with the error, so it is kept, not built again.
    again = run_flow(config(tmp_path, "student.params.fail_on=number 5", "student.batch_size=4"))
    assert (again["shards"]["resumed"], again["shards"]["built"], again["status"]) == (8, 0, "complete")


def test_a_random_3pct_fault_never_fails_a_build(tmp_path, run_flow):
    # 320 prompts, a random fault on 3% of them (the knob draws each prompt by a hash of its text); shards
    # of 32, as many as some shard exceeds 5% of its prompts: judged over the run, the build completes.
    texts = [f"question number {i}" for i in range(320)]
    drawn = {t for t in texts if int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") / 2**64 < 0.03}
    assert len(drawn) == 11
    cfg = config(tmp_path, "student.params.error_rate=0.03", "shard_size=32", "n=1", "student.batch_size=8")
    cfg.prompts.path = str(write_jsonl(tmp_path / "many.jsonl", [{"prompt": t} for t in texts]))
    manifest = run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    quarantined = ds.read_table("quarantine").to_pylist()
    assert {q["prompt"] for q in quarantined if q["reason"] == "generation_error"} == drawn
    assert manifest["status"] == "complete" and manifest["errors"] == {"generation_error": {"RuntimeError": 11}}
    worst = max(pq.read_table(f).num_rows for f in ds.listed_files("quarantine"))
    assert worst > 0.05 * 32  # the old rule (a shard's own share) would have failed this shard


def test_a_failed_run_builds_again_only_the_shards_with_errors(tmp_path, run_flow, monkeypatch):
    # The first run writes every shard, one with a generation error, and is stopped before it can commit a
    # complete version; the fault is fixed; the re-run builds that shard alone, and it has no error now.
    from tests.conftest import interrupt_at_shard

    fault = tmp_path / "fault"
    fault.touch()
    cfg = config(tmp_path, "student.params.fail_on=number 5", f"student.params.fail_while={fault}",
                 "student.batch_size=4")
    interrupt_at_shard(monkeypatch, k=8)
    with pytest.raises(KeyboardInterrupt):
        run_flow(cfg)
    ds = DatasetDir(str(tmp_path / "out"), "f")
    assert ds.read_manifest()["status"] == "incomplete"
    assert ds.read_manifest()["errors"] == {"generation_error": {"RuntimeError": 1}}
    monkeypatch.undo()
    fault.unlink()
    manifest = run_flow(cfg)
    assert (manifest["shards"]["resumed"], manifest["shards"]["built"], manifest["status"]) == (7, 1, "complete")
    assert manifest["errors"] == {} and "generation_error" not in manifest["prompts"]["quarantined"]
    assert manifest["tables"]["candidates"]["rows"] == 16 * 2 and verify(ds).problems == []


@pytest.mark.slow
def test_a_fault_on_every_generate_call_fails_the_run(tmp_path):
    # An API change, a CUDA device assert, a broken tokenizer: every generate() raises. The rows must not
    # all be quarantined with the run "complete (0 pairs)": the first shard fails with the first error
    # (8 of 8 of its prompts: surely a fault), is retried, is given up, and its 8 of 8 stop the run before
    # the second shard is needed; nothing complete is committed and the command exits 1.
    cfg = config(tmp_path, "student.params.fail_on=", "shard_size=8", "shard_retries=1", "retries=0")
    proc = cli(tmp_path, cfg)
    assert proc.wait(timeout=600) == 1, output(tmp_path)[-3000:]
    reason = ("generation failed on 8 of 8 prompts so far (RuntimeError 8): the rate is above max_error_rate 0.05 "
              "with 99.99% confidence (Wilson lower bound 0.333); first: RuntimeError: injected failure on a "
              "prompt containing")
    assert f"dafactory: error: {reason}; the manifest is marked incomplete" in output(tmp_path)
    manifest = DatasetDir(cfg.output, cfg.dataset).read_manifest()
    assert manifest["status"] == "incomplete" and manifest["tables"]["pairs"]["rows"] == 0
    assert manifest["error_rate"] == reason and manifest["shards"]["done"] == 0
    assert [f["error"] for f in manifest["shards"]["failed"]] == [
        "TooManyErrors: generation failed on 8 of 8 prompts of the shard (RuntimeError 8): the rate is above "
        "max_error_rate 0.05 with 99.99% confidence (Wilson lower bound 0.333); first: RuntimeError: injected "
        "failure on a prompt containing"]


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "..", "/abs"])
def test_dataset_names_cannot_leave_the_output_root(tmp_path, name, capsys):
    argv = ["run", "preference", "--set", f"prompts.path={prompts(tmp_path)}", "--set", f"output={tmp_path}/out",
            "--set", f"dataset={name}", "--set", "student.backend=fake"]
    assert main(argv) == 2
    assert "invalid config: dataset: String should match pattern" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()


def test_a_replica_dead_after_its_restarts_is_replaced(tmp_path, run_flow):
    from dafactory.tasks.run.build import ShardsFailed

    # 8 prompts that kill the generate worker's process every time, in 7 of the 10 shards; with
    # shard_retries 0 the replica may restart 4 times, so the 5th kill leaves it dead for good while
    # shards are still to do. They must not fail on the dead replica: a new one takes its place.
    rows = [{"prompt": f"question number {i}"} for i in range(16)] + [{"prompt": f"poison question {i}"} for i in range(8)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = build_config(PreferenceConfig, None, [
        f"output={tmp_path / 'out'}", "dataset=d", f"prompts.path={path}", "student.backend=fake", "n=2",
        "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5", "student.params.exit_on=poison",
        "shard_retries=0", "retries=0"])
    with pytest.raises(ShardsFailed, match="7 of 10 shards failed after retries"):
        run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    manifest = ds.read_manifest()
    planned = ds.read_table("prompts").to_pylist()
    poisoned = {r["shard_id"] for r in planned if r["prompt"].startswith("poison")}
    assert {f["shard_id"] for f in manifest["shards"]["failed"]} == poisoned
    clean = [r for r in planned if r["shard_id"] not in poisoned]
    assert manifest["accounting"]["prompts_with_output"] == len(clean) == 5  # every shard without poison built
    assert verify(ds).problems == []


def test_a_poisoned_replica_is_restarted_and_the_build_completes(tmp_path, run_flow):
    """A CUDA device-side assert leaves the worker alive and every later call on it failing. Ray does not
    restart a live actor: the stream restarts a replica whose shards fail twice in a row with one error."""
    poison = tmp_path / "poisoned"
    pid_file = tmp_path / "pids"
    cfg = config(tmp_path, f"student.params.poison_file={poison}", f"student.params.pid_file={pid_file}",
                 "shard_retries=2", "retries=0")
    manifest = run_flow(cfg)
    assert poison.exists()  # the first process was poisoned from its second call on
    pids = pid_file.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # restarted once, in a new (healthy) process
    assert manifest["status"] == "complete" and manifest["shards"]["failed"] == []
    assert manifest["tables"]["candidates"]["rows"] == 32 and verify(DatasetDir(cfg.output, cfg.dataset)).problems == []
