"""Output on S3 through a real S3 endpoint on loopback (moto in server mode, as s3fs's own tests do)."""

import os
import time

import pytest

from dafactory.flows.cli import main
from dafactory.tasks.config import PreferenceConfig, build_config
from dafactory.tasks.io.storage import DatasetDir
from tests.conftest import cli, output, write_jsonl

pytestmark = pytest.mark.server

SECRET = "not-a-real-secret-but-must-not-leak"


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("datasets")
    yield fs
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_preference_flow_writes_to_s3_and_resumes(tmp_path, s3, run_flow):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}", "category": "harm"} for i in range(6)])
    cfg = build_config(PreferenceConfig, None, [
        "output=s3://datasets/nightly", "dataset=pref", f"prompts.path={prompts}", "student.backend=fake",
        "n=3", "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5",
    ])
    manifest = run_flow(cfg)
    assert s3.exists("datasets/nightly/pref/manifest.json")
    assert manifest["shards"]["written_by_driver"] == 0  # the scoring replicas wrote every shard's parts
    assert sorted(s3.ls("datasets/nightly/pref/candidates")) == sorted(
        f"datasets/nightly/pref/{f}" for f in DatasetDir(cfg.output, cfg.dataset).files(manifest)["candidates"])
    ds = DatasetDir(cfg.output, cfg.dataset)
    assert ds.read_table("candidates").num_rows == 18
    assert not s3.glob("datasets/nightly/pref/**/*.tmp-*")  # one PUT per part, no temp objects
    again = run_flow(cfg)
    assert (again["shards"]["total"], again["shards"]["resumed"], again["shards"]["built"]) == (3, 3, 0)
    # credentials never reach what the run writes
    assert SECRET not in s3.cat("datasets/nightly/pref/manifest.json").decode()
    assert SECRET not in s3.cat("datasets/nightly/pref/config.json").decode()


def test_missing_bucket_fails_before_any_model(tmp_path, s3, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    argv = ["run", "preference", "--set", f"prompts.path={prompts}", "--set", "output=s3://no-such-bucket/x"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dafactory: error: cannot write to output s3://no-such-bucket/x/preference:")
    assert "\n" not in err


def test_unreachable_endpoint_fails_fast_with_one_line(tmp_path, s3, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    argv = ["run", "preference", "--set", f"prompts.path={prompts}", "--set", "output=s3://datasets/y",
            "--set", "storage_timeout_s=1.5"]
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 60
    err = capsys.readouterr().err.strip()
    assert err.startswith("dafactory: error: cannot write to output s3://datasets/y/preference:") and "\n" not in err


def no_aws_credentials(monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_credentials_from_a_prefect_secret_block(tmp_path, s3, run_flow, monkeypatch):
    from prefect.blocks.system import Secret

    from dafactory.tasks.errors import UserError

    block_secret = "block-secret-value-1234567890"
    Secret(value={"aws_access_key_id": "from-block", "aws_secret_access_key": block_secret}).save(
        "s3-creds", overwrite=True)
    no_aws_credentials(monkeypatch, tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q {i}"} for i in range(4)])
    base = ["output=s3://datasets/blocks", f"prompts.path={prompts}", "student.backend=fake", "n=2",
            "student.num_cpus=0.5", "scoring.num_cpus=0.5", "storage_retries=0"]
    # without credentials anywhere the output cannot be written: found before any model loads
    with pytest.raises(UserError, match="cannot write to output s3://datasets/blocks/no-creds"):
        run_flow(build_config(PreferenceConfig, None, base + ["dataset=no-creds"]))
    with pytest.raises(UserError, match="no Prefect Secret block named 'missing'"):
        run_flow(build_config(PreferenceConfig, None, base + ["dataset=x", "storage_block=missing"]))
    cfg = build_config(PreferenceConfig, None, base + ["dataset=with-block", "storage_block=s3-creds"])
    manifest = run_flow(cfg)
    assert manifest["status"] == "complete" and manifest["config"]["storage_block"] == "s3-creds"
    # the replicas, with no AWS environment of their own, wrote with the block's keys
    assert manifest["shards"]["written_by_driver"] == 0
    for key in ("manifest.json", "config.json"):
        assert block_secret not in s3.cat(f"datasets/blocks/with-block/{key}").decode()


def test_store_down_mid_run_fails_cleanly_then_a_rerun_completes(tmp_path, s3, run_flow, monkeypatch):
    """The endpoint goes away mid-run: writes retry with backoff, then the run fails with no manifest;
    once the endpoint is back, the same run resumes and completes."""
    import threading

    from moto.server import ThreadedMotoServer

    from dafactory.tasks.errors import StorageError
    from dafactory.tasks.io.verify import verify

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(10)])
    cfg = build_config(PreferenceConfig, None, [
        "output=s3://datasets/flaky", "dataset=d", f"prompts.path={prompts}", "student.backend=fake", "n=2",
        "shard_size=2", "student.params.latency_s=0.5", "student.num_cpus=0.5", "scoring.num_cpus=0.5",
        "storage_retries=2", "storage_timeout_s=2", "retries=0",
    ])
    ds = DatasetDir(cfg.output, cfg.dataset)

    def outage():
        while not s3.glob("datasets/flaky/d/candidates/*.parquet"):
            time.sleep(0.05)
        server.stop()

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=r"storage s3://datasets/flaky/d failed to .* after 3 attempts"):
        run_flow(cfg)
    assert time.perf_counter() - t0 < 120
    t.join(5)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # the endpoint is back
    server.start()
    try:
        assert ds.read_manifest() is None  # the failed run never looks complete
        staged = len(ds.parts("candidates"))
        assert 1 <= staged < 5
        manifest = run_flow(cfg)
        assert manifest["status"] == "complete" and manifest["shards"]["resumed"] == staged
        assert verify(ds).problems == []
    finally:
        server.stop()


def test_prefect_results_on_s3_let_another_machine_skip_planning(tmp_path, s3, run_flow):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(6)])
    cfg = build_config(PreferenceConfig, None, [
        "output=s3://datasets/shared", "dataset=r", f"prompts.path={prompts}", "student.backend=fake", "n=2",
        "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5", "result_storage=s3://datasets/prefect-results",
    ])
    first = run_flow(cfg)
    (record,) = s3.ls("datasets/prefect-results")  # the plan, persisted under its cache key
    assert record.split("/")[-1].startswith("dafactory-plan-")
    # Another machine (its own process, HOME and temporary Prefect) runs the same config: the plan comes
    # from the shared result storage, the shards from the dataset.
    proc = cli(tmp_path, cfg)
    assert proc.wait(timeout=300) == 0, output(tmp_path)
    log = output(tmp_path)
    assert "Task run 'prepare-" in log and "Finished in state Cached(type=COMPLETED)" in log, log[-3000:]
    second = DatasetDir(cfg.output, cfg.dataset).read_manifest()
    assert second["shards"]["resumed"] == 3 and second["tables"]["candidates"] == first["tables"]["candidates"]
    # the dataset is removed: the cached plan names shards that are gone, so the input is planned again
    s3.rm("datasets/shared/r", recursive=True)
    again = run_flow(cfg)
    assert again["status"] == "complete" and again["shards"]["built"] == 3


# The oldest s3fs pyproject.toml allows, with the fsspec of its release and the aiobotocore/botocore pip
# resolves for it. Before 2026.9, s3fs answered listings from its cache, which lost resumed builds' parts.
FLOOR = {"s3fs": "2025.7.0", "fsspec": "2025.7.0", "aiobotocore": "2.26.0", "botocore": "1.41.5"}


@pytest.fixture(scope="session")
def s3fs_floor(tmp_path_factory) -> dict:
    """PYTHONPATH for CLI processes that run with the oldest s3fs the package allows (installed here when
    the venv has a newer one, as its users may have)."""
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    declared = re.search(r'"s3fs>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert declared == FLOOR["s3fs"], "the floor in pyproject.toml moved: test at the new one"
    target = tmp_path_factory.mktemp("s3fs-floor")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *(f"{k}=={v}" for k, v in FLOOR.items())], check=True, capture_output=True)
    env = {"PYTHONPATH": str(target)}
    seen = subprocess.run([sys.executable, "-c", "import s3fs, fsspec; print(s3fs.__version__, fsspec.__version__)"],
                          env=dict(os.environ, **env), capture_output=True, text=True, check=True).stdout.split()
    assert seen == [FLOOR["s3fs"], FLOOR["fsspec"]]
    return env


@pytest.mark.slow
def test_a_killed_rebuild_keeps_the_last_version_on_s3_with_the_newest_and_the_oldest_s3fs(tmp_path, s3, s3fs_floor):
    """On S3 a part is one PUT, the version a conditional PUT, the pointer a PUT: kill around each, once with
    the s3fs installed here and once with the oldest one the package allows. The two run at once, each into
    a folder of its own (their CLI processes mostly wait on starts: together they take little more than one)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_versions import KILL_POINTS, killed_rebuilds

    (tmp_path / "newest").mkdir()
    (tmp_path / "oldest").mkdir()
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(killed_rebuilds, tmp_path / "newest", "s3://datasets/versions", KILL_POINTS),
                pool.submit(killed_rebuilds, tmp_path / "oldest", "s3://datasets/floor", KILL_POINTS, s3fs_floor)]
        for run in runs:
            run.result()


def test_a_version_is_committed_once_on_s3(s3):
    # s3fs sends "xb" as a conditional PUT (If-None-Match: *): a second run cannot take the same version,
    # and a retry that finds its own bytes there is done
    from dafactory.tasks.io.commit import CommitConflict, _create

    ds = DatasetDir("s3://datasets/exclusive", "d")
    path = "_versions/manifest-000001.json"
    _create(ds, path, b'{"v": 1}')
    _create(ds, path, b'{"v": 1}')
    with pytest.raises(CommitConflict, match="manifest-000001.json"):
        _create(ds, path, b'{"v": 2}')
    assert s3.cat("datasets/exclusive/d/_versions/manifest-000001.json") == b'{"v": 1}'


REPLICA = r"""
import pickle, sys
import pyarrow as pa
ds = pickle.loads(sys.stdin.buffer.read())
ds.write_bytes("from-replica.txt", b"written with what the driver sent")
print(ds.fs.cat_file(ds._path("from-replica.txt")).decode())
"""


def test_replicas_get_the_endpoint_and_keys_the_driver_resolved(tmp_path, s3):
    """A replica on another node has neither the driver's AWS environment nor its files: the folder it is
    sent carries the endpoint, region and static keys. Checked in a process with no AWS setting at all."""
    import pickle
    import subprocess
    import sys

    ds = DatasetDir("s3://datasets/replicas", "d")
    sent = ds.for_replicas()
    assert sent.credentials == {"aws_access_key_id": "testing", "aws_secret_access_key": SECRET,
                                "aws_session_token": None, "endpoint_url": os.environ["AWS_ENDPOINT_URL"],
                                "region_name": "us-east-1"}
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bare |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
             "AWS_EC2_METADATA_DISABLED": "true"}
    out = subprocess.run([sys.executable, "-c", REPLICA], input=pickle.dumps(sent), env=bare, capture_output=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "written with what the driver sent"
    # the same folder sent as it is (keys from the environment only) cannot write there
    out = subprocess.run([sys.executable, "-c", REPLICA], input=pickle.dumps(DatasetDir(
        "s3://datasets/replicas", "d", retries=0)), env=bare, capture_output=True, timeout=120)
    assert out.returncode != 0
