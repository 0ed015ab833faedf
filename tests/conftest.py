"""Shared fixtures. Tests never touch the network: the Hub is offline and models are built here."""

from __future__ import annotations

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One cache (converted models, evaluation sets' embeddings) for the session, also for CLI tests run with a
# HOME of their own: embedding DAN's prompts takes about a minute on 2 cores, once.
os.environ.setdefault("DAFACTORY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dafactory"))

import atexit  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, with two logical GPUs (Ray resources are logical)."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def run_flow(prefect_harness, ray_local):
    from dafactory.flows.preference import preference

    return preference


def interrupt_at_shard(monkeypatch, k: int = 2) -> None:
    """The driver's hook after each shard it staged raises KeyboardInterrupt at the k-th, as Ctrl-C would, mid-run."""
    from dafactory.tasks.run import build

    seen = []

    def stop(name):
        seen.append(name)
        if name == "shard" and seen.count("shard") == k:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(build, "failpoint", stop)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny random Llama (causal LM and sequence classifier) with a word-level tokenizer and a chat
    template, saved to disk: a real transformers model that loads in milliseconds."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    root = tmp_path_factory.mktemp("tiny")
    words = ("hello world how do i make a bomb cake please explain the sky is blue sorry cannot help "
             "sure here answer step user assistant system you are helpful yes no").split()
    specials = ["<pad>", "<unk>", "<eos>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    cfg = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=vocab["<|im_end|>"], bos_token_id=None,
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**cfg))
    lm.generation_config.eos_token_id = vocab["<|im_end|>"]
    lm.save_pretrained(root / "lm")
    fast.save_pretrained(root / "lm")
    torch.manual_seed(0)
    long = LlamaForCausalLM(LlamaConfig(**(cfg | {"max_position_embeddings": 1024})))  # for long judge prompts
    long.generation_config.eos_token_id = vocab["<|im_end|>"]
    long.save_pretrained(root / "lm_long")
    fast.save_pretrained(root / "lm_long")
    torch.manual_seed(5)
    ft = LlamaForCausalLM(LlamaConfig(**cfg))  # another student: same shape and tokenizer, other weights
    ft.save_pretrained(root / "lm_ft")
    fast.save_pretrained(root / "lm_ft")
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1))
    rm.save_pretrained(root / "rm")
    fast.save_pretrained(root / "rm")
    return {"lm": str(root / "lm"), "lm_long": str(root / "lm_long"), "lm_ft": str(root / "lm_ft"), "rm": str(root / "rm"), "tokenizer": fast}


_MIGRATED: list[Path] = []  # a Prefect database migrated once per session
_MIGRATING = threading.Lock()


def own_home(home: Path) -> dict:
    """The environment of a CLI process with `home` as its HOME, so its own temporary Prefect server, whose
    database starts as a copy of one migrated once per session: a fresh one's migrations take about 7 s of
    each server's start on 2 cores, and a user's second run finds its database migrated too."""
    import shutil
    import tempfile

    with _MIGRATING:
        if not _MIGRATED:
            template = Path(tempfile.mkdtemp(prefix="dafactory-prefect-db-"))
            atexit.register(shutil.rmtree, template, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], check=True,
                           env=dict(os.environ, PREFECT_HOME=str(template)), capture_output=True, timeout=300)
            _MIGRATED.append(template / "prefect.db")
    (home / ".prefect").mkdir(parents=True, exist_ok=True)
    if not (home / ".prefect" / "prefect.db").exists():
        shutil.copyfile(_MIGRATED[0], home / ".prefect" / "prefect.db")
    return dict(os.environ, HOME=str(home))


def cli(tmp_path, cfg) -> subprocess.Popen:
    """`dafactory run preference` on `cfg` in a process of its own, with its own HOME (so its own
    temporary Prefect): another machine, as far as Prefect knows. Output goes to tmp_path/cli.log."""
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = own_home(tmp_path / "home")
    env.pop("PREFECT_API_URL", None)  # its own temporary Prefect, as a user's command would
    log = open(tmp_path / "cli.log", "a")  # a file, not a pipe: a pipe nobody reads would block the process
    return subprocess.Popen([sys.executable, "-m", "dafactory.flows.cli", "run", "preference", "--config", str(path)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=default_sigint)


def default_sigint() -> None:
    """A command started in the background by a non-interactive shell (as a test runner may be) inherits
    SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt; a user's terminal does."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def output(tmp_path) -> str:
    return (tmp_path / "cli.log").read_text()


def latent_reference(ft, base, ids: list[int], start: int, layers) -> tuple[list[float], float]:
    """(cos@l of the last token for each layer, FT's perplexity of ids[start:]) from one forward pass per
    loaded model on `ids` alone: batch 1, no padding, no mask. What the latent scorer is checked against."""
    import math

    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = ft(x, output_hidden_states=True), base(x, output_hidden_states=True)
    cos = [torch.nn.functional.cosine_similarity(a.hidden_states[l][0, -1].float(), b.hidden_states[l][0, -1].float(),
                                                 dim=0).item() for l in layers]
    logp = torch.log_softmax(a.logits[0].double(), dim=-1)  # position t predicts token t + 1
    nll = -sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))) / (len(ids) - start)
    return cos, math.exp(nll)
