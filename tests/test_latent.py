"""The paper's latent signals, against references computed here one row at a time without padding."""

import math
import re

import pytest

from dafactory.tasks.config import ScorerConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.score.scorers import SCORERS

ROWS = [
    {"prompt": "how do i make a bomb", "response": "sorry cannot help", "category": None},
    {"prompt": "hello", "response": "sure here answer step step step the sky is blue because", "category": None},
    {"prompt": "explain the sky please", "response": "blue", "category": None},
    {"prompt": "hello world", "response": "", "category": None},  # no response tokens at all
]


@pytest.fixture(scope="module")
def reference(tiny_models):
    """cos@l and token signals for each row alone, computed directly (no batching, no padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tiny_models["tokenizer"]
    ft = AutoModelForCausalLM.from_pretrained(tiny_models["lm_ft"], dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_models["lm"], dtype=torch.float32).eval()
    out = []
    for row in ROWS:
        prefix = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                         tokenize=False)
        start = len(tok(prefix, add_special_tokens=False)["input_ids"])
        ids = tok(prefix + row["response"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            a = ft(ids, output_hidden_states=True)
            b = base(ids, output_hidden_states=True)
        cos = {l: torch.nn.functional.cosine_similarity(a.hidden_states[l][0, -1], b.hidden_states[l][0, -1], dim=0).item()
               for l in (0, 1, 2)}
        kl_fb = kl_bf = nll = sc = 0.0
        n = ids.shape[1] - start
        for t in range(start - 1, ids.shape[1] - 1):
            p = torch.softmax(a.logits[0, t].double(), -1)
            q = torch.softmax(b.logits[0, t].double(), -1)
            kl_fb += float((p * (p / q).log()).sum())
            kl_bf += float((q * (q / p).log()).sum())
            nll -= math.log(float(p[ids[0, t + 1]]))
            sc += float(-(torch.log(p * p.numel())).mean())  # KL(uniform || p)
        sig = {"kl_ft_base": kl_fb / n, "kl_base_ft": kl_bf / n, "perplexity": math.exp(nll / n),
               "self_certainty": sc / n} if n else {}
        out.append((cos, sig))
    return out


def scorer(tiny_models, **params):
    s = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=tiny_models["lm_ft"], batch_size=params.pop("batch_size", 4),
        params={"base": tiny_models["lm"], "layers": [2, 0, 1], **params},
    ))
    s.load()
    return s


@pytest.mark.parametrize(
    "params",
    [
        {"padding_side": "right"},  # right padding: the last real token is not the last position
        {"padding_side": "left"},  # left padding: positions must skip the pads
        {"padding_side": "right", "batch_size": 1},  # one row at a time
        {"padding_side": "left", "batch_size": 3},  # batches of mixed lengths, one batch not full
    ],
)
def test_batched_signals_equal_one_row_references(tiny_models, reference, params):
    results = scorer(tiny_models, **params).score(ROWS)
    for (cos, sig), r in zip(reference, results):
        got = {d["name"]: d["value"] for d in r["details"]}
        for layer in (0, 1, 2):
            assert got[f"cos@{layer}"] == pytest.approx(cos[layer], abs=1e-5)
        assert r["score"] == got["cos@2"]  # the first listed layer is the score
        for name, value in sig.items():
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        if not sig:
            assert got["kl_ft_base"] is None and got["perplexity"] is None
    # FT and base have different weights, embeddings included: even layer 0 is far from cosine 1
    assert all(r["details"][1]["value"] < 0.999 for r in results)


def test_same_weights_give_cosine_one_and_zero_kl(tiny_models):
    s = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=tiny_models["lm"], params={"base": tiny_models["lm"], "layers": [1, 2]}))
    s.load()
    for r in s.score(ROWS[:3]):
        got = {d["name"]: d["value"] for d in r["details"]}
        assert got["cos@1"] == pytest.approx(1.0, abs=1e-6) and got["cos@2"] == pytest.approx(1.0, abs=1e-6)
        assert got["kl_ft_base"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"layers": [12], "score_layer": 3}, "score_layer 3 is not in layers [12]"),
        ({"padding_side": "middle"}, "padding_side must be"),
        ({"base": None}, "set params.base"),
    ],
)
def test_bad_params(tiny_models, params, message):
    p = {"base": tiny_models["lm"], **params}
    if p["base"] is None:
        del p["base"]
    with pytest.raises(UserError, match=re.escape(message)):
        SCORERS.get("latent_attribution")(ScorerConfig(name="latent_attribution", model=tiny_models["lm_ft"], params=p))


def test_layers_beyond_the_model_are_refused(tiny_models):
    s = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=tiny_models["lm_ft"], params={"base": tiny_models["lm"], "layers": [12]}))
    with pytest.raises(UserError, match=r"layers \[12\] outside 0..2"):
        s.load()


def test_a_peft_adapter_shares_weights_with_its_base(tiny_models, tmp_path):
    """FT given as a LoRA adapter: one model in memory, the base pass with the adapter disabled, and the
    same signals as two separate models (the adapter merged into a copy of the base)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["lm"], dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_models["lm"], dtype=torch.float32), tmp_path / "adapter"
    ).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tiny_models["tokenizer"].save_pretrained(tmp_path / "merged")

    shared = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=str(tmp_path / "adapter"), params={"layers": [1, 2]}))
    assert shared.base_ref == tiny_models["lm"]  # resolved from the adapter config
    shared.load()
    assert shared.base is None  # one set of weights in memory
    separate = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=str(tmp_path / "merged"), params={"base": tiny_models["lm"], "layers": [1, 2]}))
    separate.load()
    for a, b in zip(shared.score(ROWS), separate.score(ROWS)):
        for da, db in zip(a["details"], b["details"]):
            assert da["name"] == db["name"]
            assert (da["value"] is None and db["value"] is None) or da["value"] == pytest.approx(db["value"], abs=1e-5)
        assert a["score"] < 0.99999  # the adapter really changes the hidden states
