"""Output on S3 through a real S3 endpoint on loopback (moto in server mode, as s3fs's own tests do)."""

import json
import os
import time

import pytest

from flows.cli import main
from tasks.config import PreferenceConfig, build_config
from tasks.storage import DatasetDir
from tests.conftest import write_jsonl

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
    assert sorted(s3.ls("datasets/nightly/pref/candidates")) == sorted(
        f"datasets/nightly/pref/{f}" for f in manifest["tables"]["candidates"]["files"])
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
