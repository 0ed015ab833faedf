"""Security: safetensors-only weights, no remote code by default, secrets redacted, servers on loopback."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from dafactory.tasks.config import EMBEDDED_MODEL, ModelConfig, ScorerConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.io.redact import _FILTER, install_log_filter, is_secret_key, redact, redact_text

PLANTED = "planted-S3CR3T-value-123"
HF = "hf_" + "A1b2C3d4E5" * 3 + "xyz"  # 33 characters after hf_


# --- redaction -----------------------------------------------------------------------------------


@pytest.fixture
def env_secrets(monkeypatch):
    for name in [n for n in os.environ if n.startswith(("AWS_", "HF_TOKEN"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value-456")
    monkeypatch.setenv("HF_TOKEN", "short")  # too short to mask: would garble every log
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-but-long-enough")  # TOKENIZERS is not TOKEN
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/home/me/.aws/credentials")  # a path, not a secret


@pytest.mark.parametrize(
    "text, expected",
    [
        # values of secret-looking environment variables, wherever they show
        (f"copying with key {PLANTED} now", "copying with key *** now"),
        ("s3 session-token-value-456.", "s3 ***."),
        # short values, other variables' values and credential file paths stay
        ("token short, false-but-long-enough", "token short, false-but-long-enough"),
        ("reading /home/me/.aws/credentials", "reading /home/me/.aws/credentials"),
        # AWS access key ids, long-term and temporary
        ("id AKIAABCDEFGHIJKLMNOP and ASIA0123456789ABCDEF", "id *** and ***"),
        ("AKIAABCDEFGH too short", "AKIAABCDEFGH too short"),
        # Hugging Face tokens
        (f"login {HF} ok", "login *** ok"),
        ("hf_short stays", "hf_short stays"),
        # bearer tokens
        ("Authorization: Bearer eyJhbGciOi.J9-x_y", "Authorization: Bearer ***"),
        # credentials in URLs, and a secret in the query string
        ("https://user:p4ss@example.com/x?token=abc&page=2", "https://***@example.com/x?token=***&page=2"),
        ("s3://key:secret@bucket/prefix", "s3://***@bucket/prefix"),
        ("http://example.com/?email=a@b.com", "http://example.com/?email=a@b.com"),  # no userinfo
        ("http://127.0.0.1:4200/api", "http://127.0.0.1:4200/api"),
        # key=value and "key": "value" pairs whose key names a secret
        ("aws_secret_access_key=abc123 region=us-east-1", "aws_secret_access_key=*** region=us-east-1"),
        ('password="hunter 2" user=bob', 'password="***" user=bob'),
        ("--hf-token=abc --set student.api_key=zzz", "--hf-token=*** --set student.api_key=***"),
        ('{"api_key": "sk-123", "model": "x"}', '{"api_key": "***", "model": "x"}'),
        ("{'hf_token': 'abc', 'client_secret': 'q'}", "{'hf_token': '***', 'client_secret': '***'}"),
        # token counts and a tokenizer's special tokens are not secrets
        ("max_new_tokens=256 pad_token=<pad> pad_token_id=0", "max_new_tokens=256 pad_token=<pad> pad_token_id=0"),
        # already redacted text stays as it is
        ("Bearer *** token=*** s3://***@b", "Bearer *** token=*** s3://***@b"),
    ],
)
def test_redact_text(env_secrets, text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "key, secret",
    [
        ("aws_secret_access_key", True),
        ("AWS_ACCESS_KEY_ID", True),
        ("aws_session_token", True),
        ("token", True),
        ("hf-token", True),
        ("accessToken", True),
        ("apiKey", True),
        ("password", True),
        ("private_key", True),
        ("max_new_tokens", False),  # a count
        ("pad_token", False),  # a tokenizer's special token
        ("pad_token_id", False),
        ("tokenizer", False),
        ("trust_remote_code", False),
        ("allow_pickle_weights", False),
    ],
)
def test_is_secret_key(key, secret):
    assert is_secret_key(key) is secret


def test_redact_objects(env_secrets):
    manifest = {
        "config": {"output": "s3://AKIAABCDEFGHIJKLMNOP:x@bucket/p", "storage_options": {"secret": 12345, "key": "k"}},
        "env": [("AWS_SECRET_ACCESS_KEY", PLANTED)],
        "token": None,  # a secret-looking key is masked whatever its value
        "counts": {"max_new_tokens": 256, "rows": 3, "ratio": 0.5, "ok": True},
    }
    assert redact(manifest) == {
        "config": {"output": "s3://***@bucket/p", "storage_options": {"secret": "***", "key": "k"}},
        "env": [("AWS_SECRET_ACCESS_KEY", "***")],
        "token": "***",
        "counts": {"max_new_tokens": 256, "rows": 3, "ratio": 0.5, "ok": True},
    }
    assert manifest["env"][0][1] == PLANTED  # a copy: the input is untouched


@pytest.fixture
def restore_logging():
    """The process's logging as it was before the test installed the filter."""
    factory = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(factory)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            handler.removeFilter(_FILTER)


def _stream_handler(logger: logging.Logger) -> io.StringIO:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger.addHandler(handler)
    return out


def test_logs_of_tasks_are_redacted(env_secrets, restore_logging, monkeypatch):
    log = logging.getLogger("tasks.security_probe")
    monkeypatch.setattr(log, "propagate", False)
    monkeypatch.setattr(log, "level", logging.INFO)
    before = _stream_handler(log)  # present when the filter is installed
    try:
        install_log_filter()
        install_log_filter()  # idempotent: one factory wrapper, one filter per handler
        assert sum(f is _FILTER for f in log.handlers[0].filters) == 1
        after = _stream_handler(log)  # added later: the record factory still masks
        log.info("connecting with %s to %s", PLANTED, "https://u:pw@host/x")
        try:
            raise RuntimeError(f"auth failed for {PLANTED}")
        except RuntimeError:
            log.exception("upload failed, token=%s", "abc")
        # A record rebuilt from another process's dict skips the factory: the handler's filter masks it.
        log.handlers[0].handle(logging.makeLogRecord(
            {"name": log.name, "msg": "rebuilt %s", "args": (PLANTED,), "levelno": logging.INFO}
        ))
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
    for out in (before.getvalue(), after.getvalue()):
        assert PLANTED not in out
        assert "tasks.security_probe connecting with *** to https://***@host/x\n" in out
        assert "tasks.security_probe upload failed, token=***\n" in out
        assert "RuntimeError: auth failed for ***" in out  # the traceback too
    assert "tasks.security_probe rebuilt ***\n" in before.getvalue()


def test_logs_shipped_to_the_prefect_api_are_redacted(env_secrets, restore_logging):
    """What Prefect's APILogHandler (on prefect.flow_runs, where the run logger writes) would send."""
    from prefect import flow  # noqa: F401  (importing prefect's main configures its logging)
    from prefect.logging.handlers import APILogHandler, set_api_log_sink

    run_logger = logging.getLogger("prefect.flow_runs")
    assert any(isinstance(h, APILogHandler) for h in run_logger.handlers)
    sent: list[dict] = []
    set_api_log_sink(sent.append)
    try:
        install_log_filter()  # at flow start, after Prefect set up its handlers
        run_logger.warning("wrote config %s", {"aws_secret_access_key": PLANTED}, extra={"flow_run_id": str(uuid.uuid4())})
    finally:
        set_api_log_sink(None)
    assert [s["message"] for s in sent] == ["wrote config {'aws_secret_access_key': '***'}"]


# --- model weights and remote code -----------------------------------------------------------------


class Boom:
    """A pickle that writes a marker file when loaded: what a malicious .bin can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def _copy_without_weights(src: str, dst: Path) -> Path:
    dst.mkdir()
    for f in Path(src).iterdir():
        if not f.name.endswith(".safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture
def pickle_only(tiny_models, tmp_path):
    """The tiny LM with its weights as pytorch_model.bin (a real state dict), and a twin whose .bin
    runs code when unpickled."""
    import torch
    from safetensors.torch import load_file

    good = _copy_without_weights(tiny_models["lm"], tmp_path / "pickled")
    torch.save(load_file(Path(tiny_models["lm"]) / "model.safetensors"), good / "pytorch_model.bin")
    evil = _copy_without_weights(tiny_models["lm"], tmp_path / "evil")
    torch.save(Boom(tmp_path / "pwned"), evil / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    return {"good": good, "evil": evil, "marker": tmp_path / "pwned"}


def _pickle_message(ref) -> str:
    return (f"model {str(ref)!r} has only pickle weights (pytorch_model.bin), which can run code when loaded: "
            "convert them to safetensors, or set allow_pickle_weights: true in this model's config if you trust it")


def test_pickle_weights_are_refused_before_loading(pickle_only):
    from dafactory.tasks.generate.backends.hf import HFBackend
    from dafactory.tasks.generate.models import check_reference

    for ref in (pickle_only["good"], pickle_only["evil"]):
        with pytest.raises(UserError) as err:
            check_reference(str(ref))  # preflight, one line, before any worker starts
        assert str(err.value) == _pickle_message(ref)
        with pytest.raises(UserError, match="allow_pickle_weights"):
            HFBackend(ModelConfig(model=str(ref))).load()
    assert not pickle_only["marker"].exists()


@pytest.mark.parametrize("scorer", ["reward_model", "llama_guard"])
def test_scorers_and_judges_refuse_pickle_weights(pickle_only, scorer):
    from dafactory.tasks.score.scorers import SCORERS

    s = SCORERS.get(scorer)(ScorerConfig(name=scorer, model=str(pickle_only["evil"])))
    with pytest.raises(UserError) as err:
        s.load()
    assert str(err.value) == _pickle_message(pickle_only["evil"])
    assert not pickle_only["marker"].exists()


def test_loading_itself_is_safetensors_only(pickle_only):
    """Past the preflight check (a path that changed since, a Hub repo): from_pretrained gets
    use_safetensors=True and never unpickles the file."""
    from transformers import AutoModelForCausalLM

    from dafactory.tasks.generate.models import ResolvedModel, load_model

    ref = str(pickle_only["evil"])
    with pytest.raises(UserError) as err:
        load_model(AutoModelForCausalLM, ResolvedModel(ref, ref, None), trust_remote_code=False)
    assert str(err.value) == (
        f"model {ref!r} has no safetensors weights: convert them, or set allow_pickle_weights: true in this "
        "model's config if you trust its pickle weights"
    )
    assert not pickle_only["marker"].exists()


def test_pickle_weights_load_when_the_config_opts_in(pickle_only, tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    from dafactory.tasks.generate.backends.hf import HFBackend

    backend = HFBackend(ModelConfig(model=str(pickle_only["good"]), allow_pickle_weights=True))
    backend.load()
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["lm"], dtype=torch.float32)
    for (name, a), (_, b) in zip(backend.model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_pickled_peft_adapter_is_refused(tiny_models, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dafactory.tasks.score.scorers import SCORERS

    base = AutoModelForCausalLM.from_pretrained(tiny_models["lm"], dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(weights), tmp_path / "adapter" / "adapter_model.bin")
    weights.unlink()

    def scorer(**kw):
        return SCORERS.get("latent_attribution")(ScorerConfig(
            name="latent_attribution", model=str(tmp_path / "adapter"), params={"layers": [1]}, **kw))

    with pytest.raises(UserError) as err:
        scorer().load()
    assert str(err.value) == _pickle_message(tmp_path / "adapter").replace("pytorch_model.bin", "adapter_model.bin")
    opted_in = scorer(allow_pickle_weights=True)
    opted_in.load()
    assert opted_in.base is None  # loaded as an adapter on its base


@pytest.mark.parametrize("files, loads", [
    (["adapter_config.json", "adapter_model.safetensors"], True),
    # only pickle weights: refused before PEFT, which would fall back to them, sees the repo
    (["adapter_config.json", "adapter_model.bin"], False),
])
def test_a_hub_adapter_is_read_as_safetensors_only(tmp_path, monkeypatch, files, loads):
    """A Hub adapter (here in an offline Hugging Face cache) goes to PEFT as a local folder that holds
    only its safetensors."""
    from huggingface_hub import constants

    from dafactory.tasks.generate.models import ResolvedModel, adapter_source

    repo = tmp_path / "hub" / "models--org--adapter"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in files:
        (snapshot / name).write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    resolved = ResolvedModel("org/adapter", "org/adapter", None)
    if loads:
        assert adapter_source(resolved) == str(snapshot)
    else:
        with pytest.raises(UserError, match="adapter 'org/adapter' has no adapter_model.safetensors"):
            adapter_source(resolved)
        opted_in = ResolvedModel("org/adapter", "org/adapter", None, allow_pickle_weights=True)
        assert adapter_source(opted_in) == "org/adapter"  # PEFT's own lookup, pickle allowed


@pytest.fixture
def remote_code_model(tiny_models, tmp_path):
    """The tiny LM whose config.json maps the Auto classes to its own code, which leaves a marker file
    when it is imported."""
    model = _copy_without_weights(tiny_models["lm"], tmp_path / "remote")
    (model / "model.safetensors").write_bytes((Path(tiny_models["lm"]) / "model.safetensors").read_bytes())
    marker = tmp_path / "remote-code-ran"
    (model / "custom_llama.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        from transformers import LlamaConfig, LlamaForCausalLM

        Path({str(marker)!r}).write_text("remote code ran")

        class CustomConfig(LlamaConfig):
            model_type = "llama"

        class CustomModel(LlamaForCausalLM):
            config_class = CustomConfig
    """))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_llama.CustomConfig",
                          "AutoModelForCausalLM": "custom_llama.CustomModel"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_remote_code_runs_only_when_the_config_opts_in(remote_code_model):
    from dafactory.tasks.generate.backends.hf import HFBackend

    model, marker = remote_code_model
    default = HFBackend(ModelConfig(model=str(model)))
    default.load()
    assert not marker.exists()  # the repository's code was never imported
    assert type(default.model).__name__ == "LlamaForCausalLM"  # transformers' own class
    trusted = HFBackend(ModelConfig(model=str(model), trust_remote_code=True))
    trusted.load()
    assert marker.read_text() == "remote code ran"  # the same model with the opt-in does run it
    assert type(trusted.model).__name__ == "CustomModel"


@pytest.mark.slow
def test_the_embedded_default_is_cached_as_safetensors():
    """The bundled GGUF is converted once into a safetensors folder, which loads safetensors-only."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from dafactory.tasks.generate.models import EMBEDDED_PACKAGE, load_model, resolve

    if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
        pytest.skip("the embedded default model is not installed")

    resolved = resolve(EMBEDDED_MODEL)
    names = {p.name for p in Path(resolved.source).iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    model = load_model(AutoModelForCausalLM, resolved, trust_remote_code=False)
    assert model.config.num_hidden_layers == 30


# --- servers on loopback ---------------------------------------------------------------------------

# The local Ray of tasks.run.session.ray_session. Ray binds its servers to every interface, and turns 127.0.0.1
# into the host's address, unless clusters are off (its macOS/Windows default); then the node address is
# 127.0.0.1 and every server listens there. Workers redact their logs through the setup hook.
RAY_PROBE = """
import io, json, logging, os, psutil, ray
from dafactory.tasks.config import RayConfig
from dafactory.tasks.run.session import ray_session
session = ray_session(RayConfig(num_cpus=1, num_gpus=0))
session.__enter__()

@ray.remote
class Probe:
    def log(self, secret):
        out = io.StringIO()
        log = logging.getLogger("tasks.probe")
        log.addHandler(logging.StreamHandler(out))
        log.warning("worker got %s", secret)
        return out.getvalue()

worker_log = ray.get(Probe.remote().log.remote(os.environ["AWS_SECRET_ACCESS_KEY"]))
me = psutil.Process()
found = []
for p in [me, *me.children(recursive=True)]:
    try:
        conns, name = p.net_connections(kind="inet"), p.name()
    except psutil.NoSuchProcess:  # a short-lived helper that exited meanwhile listens on nothing
        continue
    for c in conns:
        if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # TCP listening, UDP bound
            found.append([name, c.laddr.ip, c.laddr.port])
session.__exit__(None, None, None)
print(json.dumps({"found": found, "worker_log": worker_log}))
"""


def test_local_ray_listens_on_loopback_only_and_its_workers_redact():
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", AWS_SECRET_ACCESS_KEY=PLANTED)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", RAY_PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    found = result["found"]
    names = {name for name, _, _ in found}
    assert {"gcs_server", "raylet"} <= names, found  # the servers were seen, so the check means something
    exposed = [f for f in found if f[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert exposed == [], exposed
    assert result["worker_log"] == "worker got ***\n"


# --- end to end: a planted credential never reaches what a run writes --------------------------------


def test_planted_credential_never_reaches_files_logs_or_artifacts(tmp_path, run_flow, monkeypatch):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from dafactory.tasks.config import PreferenceConfig, build_config
    from tests.conftest import write_jsonl

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED)
    token = "hf_" + "A1b2C3d4" * 5
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q {i}"} for i in range(3)])
    cfg = build_config(PreferenceConfig, None, [
        f"output={tmp_path / 'out'}", "dataset=s", f"prompts.path={prompts}", "student.backend=fake", "n=2",
        "student.num_cpus=0.5", "scoring.num_cpus=0.5",
        f"student.params.api_token={PLANTED}", f"student.params.note=uses {token}",
    ])
    manifest = run_flow(cfg)
    assert manifest["config"]["student"]["params"] == {"api_token": "***", "note": "uses ***"}
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(written) >= 6
    for path in written:
        data = path.read_bytes()
        assert PLANTED.encode() not in data and token.encode() not in data, path

    async def logs_and_artifacts():
        async with get_client() as client:
            runs = await client.read_flow_runs(limit=200)
            (run,) = [r for r in runs if r.name == "preference-s"]
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200)
            artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            return [log.message for log in logs], [str(a.data) + str(a.description) for a in artifacts]

    # the run's logs reach the server in batches, in the background: all of them first
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    logs, artifacts = asyncio.run(logs_and_artifacts())
    (config_line,) = [m for m in logs if m.startswith("config ")]  # the run's config is logged, masked
    assert '"api_token":"***"' in config_line.replace(" ", "") and "uses ***" in config_line
    assert artifacts and logs
    for text in logs + artifacts:
        assert PLANTED not in text and token not in text


def test_the_temporary_prefect_server_listens_on_loopback_only(prefect_harness):
    from urllib.parse import urlparse

    import psutil
    from prefect.settings import PREFECT_API_URL

    port = urlparse(PREFECT_API_URL.value()).port
    listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening == ["127.0.0.1"]
