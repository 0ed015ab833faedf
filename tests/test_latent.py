"""The paper's latent signals, against references computed here one row at a time without padding, on
the context the student generated in (system prompt, chat template, its own response token ids)."""

import math
import re
import shutil
import string

import pytest

from dafactory.tasks.config import ModelConfig, SamplingConfig, ScorerConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.score.scorers import SCORERS
from tests.conftest import latent_reference

# Rows without a system prompt or token ids (as a text-only caller gives them): the response is tokenised.
ROWS = [
    {"prompt": "how do i make a bomb", "response": "sorry cannot help", "category": None},
    {"prompt": "hello", "response": "sure here answer step step step the sky is blue because", "category": None},
    {"prompt": "explain the sky please", "response": "blue", "category": None},
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
               "self_certainty": sc / n}
        out.append((cos, sig))
    return out


def latent_scorer(ft, base, batch_size: int, **params):
    """The latent_attribution scorer of `ft` against `base` on layers (2, 0, 1), loaded."""
    s = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=ft, batch_size=batch_size,
        params={"base": base, "layers": [2, 0, 1], **params},
    ))
    s.load()
    return s


def scorer(tiny_models, **params):
    return latent_scorer(tiny_models["lm_ft"], tiny_models["lm"], params.pop("batch_size", 4), **params)


@pytest.mark.parametrize(
    "params",
    [
        {"padding_side": "right"},  # right padding: the last real token is not the last position
        {"padding_side": "left"},  # left padding: positions must skip the pads
        {"padding_side": "right", "batch_size": 1},  # one row at a time
        {"padding_side": "left", "batch_size": 2},  # batches of mixed lengths, one batch not full
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
    # FT and base have different weights, embeddings included: even layer 0 is far from cosine 1
    assert all(r["details"][1]["value"] < 0.999 for r in results)


def test_same_weights_give_cosine_one_and_zero_kl(tiny_models):
    s = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=tiny_models["lm"], params={"base": tiny_models["lm"], "layers": [1, 2]}))
    s.load()
    for r in s.score(ROWS):
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


@pytest.mark.parametrize("targets", [
    ["q_proj", "v_proj"],
    ["q_proj", "v_proj", "lm_head"],  # the output head adapted too: the base pass reads its base layer
])
def test_a_peft_adapter_shares_weights_with_its_base(tiny_models, tmp_path, targets):
    """FT given as a LoRA adapter: one model in memory, the base pass with the adapter disabled, and the
    same signals as two separate models (the adapter merged into a copy of the base)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["lm"], dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
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
            assert (da["value"] is None and db["value"] is None) or da["value"] == pytest.approx(db["value"], rel=1e-6,
                                                                                                 abs=1e-5)
        assert a["score"] < 0.99999  # the adapter really changes the hidden states


# --- the student's own context -------------------------------------------------------------------------

WORDS = ("hello world how do i make a bomb cake please explain the sky is blue sorry cannot help "
         "sure here answer step user assistant system you are helpful yes no").split()
SYSTEM = "you are helpful"
ATOL = 2e-6  # float32 with and without padding, batched or alone: the same values to rounding


def word_tokenizer(template: str | None, bos: bool):
    """Word-level, like the conftest one; `bos`: a post-processor that adds <bos> to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = template
    return fast


def merging_tokenizer():
    """Characters, and one BPE merge ":" + "s" -> ":s". The generation prompt ends in ":", so a response
    that starts with "s", tokenised together with its prompt, loses its first token to the prompt's last."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_lowercase) + [" ", ":", ":s"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(":", "s")], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # characters decode back to the text, spaces included
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}<|im_end|>{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")
    return fast


CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")

# (system prompt, request, the tokens the student generated); for the merging tokenizer, one token a character
WORD_SAMPLES = [
    (SYSTEM, "how do i make a bomb", "sorry cannot help".split()),
    (SYSTEM, "hello", "sure here answer step step the sky is blue".split()),
    (SYSTEM, "explain the sky please", ["blue"]),  # one response token
    (SYSTEM, "hello world", ["sure", "<unk>", "yes"]),  # a special token: the decoded text drops it
    (None, "hello", ["yes", "no"]),  # no system prompt
]
CHAR_SAMPLES = [
    (SYSTEM, "how do i make a bomb", list("sorry")),  # starts with "s": merges with the prompt's ":"
    (SYSTEM, "hello", list("sure here is the answer")),
    (SYSTEM, "explain the sky please", list("blue")),  # no merge at the boundary
    (None, "hello", list("sky")),
]
STUDENTS = {
    "template": (lambda: word_tokenizer(CHATML, bos=False), WORD_SAMPLES),  # ChatML-like, as conftest's
    "template_bos": (lambda: word_tokenizer("{{ bos_token }} " + CHATML, bos=True), WORD_SAMPLES),  # BOS once
    "no_template": (lambda: word_tokenizer(None, bos=True), WORD_SAMPLES),  # turns joined by blank lines, BOS
    "merging": (merging_tokenizer, CHAR_SAMPLES),
}


def save_student(root, tok) -> tuple[str, str]:
    """FT and base: tiny Llamas of one shape over `tok`, with different weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    paths = []
    for name, seed in (("ft", 5), ("base", 0)):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


def context_ids(tok, system: str | None, prompt: str) -> list[int]:
    """The ids the student was given, built by hand: the chat template with its generation prompt,
    tokenised without special tokens (a template writes its own BOS); with no template, the turns joined
    by blank lines and the tokenizer's own special tokens."""
    if not tok.chat_template:
        return tok("\n\n".join([system, prompt] if system else [prompt]) + "\n\n")["input_ids"]
    conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module", params=list(STUDENTS))
def student(request, tmp_path_factory):
    """A student (its tokenizer, FT and base folders), its generated rows, and each row's reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make, samples = STUDENTS[request.param]
    ft_path, base_path = save_student(tmp_path_factory.mktemp(request.param), make())
    tok = AutoTokenizer.from_pretrained(ft_path)  # as the student and the scorer load it
    ft, base = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (ft_path, base_path))
    rows, refs = [], []
    for system, prompt, tokens in samples:
        generated = tok.convert_tokens_to_ids(tokens)
        rows.append({"prompt": prompt, "category": None, "system_prompt": system, "prefill": "",
                     "response": tok.decode(generated, skip_special_tokens=True), "response_token_ids": generated})
        prompt_ids = context_ids(tok, system, prompt)
        refs.append(latent_reference(ft, base, prompt_ids + generated, len(prompt_ids), (2, 0, 1)))
    return {"kind": request.param, "tok": tok, "ft": ft_path, "base": base_path, "models": (ft, base),
            "rows": rows, "refs": refs}


def assert_cosines(results, refs):
    """Each row's cos@ values equal its one-row reference's; returns them (rows x layers)."""
    import torch

    got = torch.tensor([[d["value"] for d in r["details"] if d["name"].startswith("cos@")] for r in results],
                       dtype=torch.float64)
    want = torch.tensor([cos for cos, _ in refs], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=ATOL), (got - want).abs().max()
    return got


def student_scorer(student, **params):
    return latent_scorer(student["ft"], student["base"], params.pop("batch_size", 8), **params)


@pytest.mark.parametrize(
    "params",
    [
        {"padding_side": "right"},  # one batch, right padding
        {"padding_side": "left"},  # one batch, left padding: positions skip the pads
        {"padding_side": "left", "batch_size": 2},  # batches of mixed lengths, the last not full
        {"padding_side": "right", "batch_size": 3},  # right padding across two batches
    ],
)
def test_signals_are_read_on_the_students_own_context(student, params):
    import torch

    results = student_scorer(student, **params).score(student["rows"])
    got = assert_cosines(results, student["refs"])
    # the perplexity covers exactly the generated tokens: a window shifted by one would be far off
    got_ppl = torch.tensor([next(d["value"] for d in r["details"] if d["name"] == "perplexity") for r in results],
                           dtype=torch.float64)
    want_ppl = torch.tensor([ppl for _, ppl in student["refs"]], dtype=torch.float64)
    assert torch.allclose(got_ppl, want_ppl, rtol=1e-5, atol=0), (got_ppl - want_ppl).abs().max()
    assert [r["score"] for r in results] == got[:, 0].tolist()  # cos@2, the first listed layer


def test_the_references_differ_where_the_old_encoding_went_wrong(student):
    """The cases above are not vacuous: each student's reference context differs from what a scorer that
    ignored the system prompt, re-tokenised the response with its prompt, or added BOS twice would read."""
    tok, (ft, base) = student["tok"], student["models"]
    bos = tok.convert_tokens_to_ids("<bos>") if "<bos>" in tok.get_vocab() else None
    for row, (cos, _) in zip(student["rows"], student["refs"]):
        prompt_ids = context_ids(tok, row["system_prompt"], row["prompt"])
        if student["kind"] in ("template_bos", "no_template"):
            assert prompt_ids[0] == bos and prompt_ids.count(bos) == 1
        if row["system_prompt"]:
            alone = context_ids(tok, None, row["prompt"])
            cos_alone, _ = latent_reference(ft, base, alone + row["response_token_ids"], len(alone), (2,))
            assert abs(cos_alone[0] - cos[0]) > 20 * ATOL
    if student["kind"] == "merging":
        row = student["rows"][0]
        prompt_ids = context_ids(tok, row["system_prompt"], row["prompt"])
        text = tok.decode(prompt_ids) + row["response"]
        joint = tok(text, add_special_tokens=False)["input_ids"]
        assert joint[: len(prompt_ids)] != prompt_ids  # ":" and "s" became one token
        assert len(joint) == len(prompt_ids) + len(row["response_token_ids"]) - 1


@pytest.mark.parametrize(
    "ids",
    [
        None,  # no ids (a text-only caller)
        [10**6],  # ids outside the scorer's vocabulary (another generator's)
        "hash",  # in range, but spelling something else (the fake backend's are hashes)
    ],
)
def test_without_the_students_ids_the_response_is_tokenised_on_its_own(student, ids, caplog):
    """Never together with the prompt: its first token cannot merge into the prompt's last."""
    import torch

    tok, (ft, base) = student["tok"], student["models"]
    rows, want = [], []
    for row in student["rows"]:
        response = tok(row["response"], add_special_tokens=False)["input_ids"]
        if not response:
            continue
        other = None if ids is None else ids if ids != "hash" else [response[-1]] * (len(response) + 1)
        rows.append(dict(row, response_token_ids=other))
        prompt_ids = context_ids(tok, row["system_prompt"], row["prompt"])
        want.append(latent_reference(ft, base, prompt_ids + response, len(prompt_ids), (2, 0, 1))[0])
    results = student_scorer(student, padding_side="left").score(rows)
    got = [[d["value"] for d in r["details"] if d["name"].startswith("cos@")] for r in results]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                          rtol=0, atol=ATOL)
    warned = [r for r in caplog.records if "re-tokenising the response text" in r.getMessage()]
    assert len(warned) == (0 if ids is None else 1)  # once per scorer, not once per row


def test_an_empty_response_has_a_null_score_with_the_reason(tiny_models):
    """Never the template's last token, which every sample of the prompt shares."""
    s = scorer(tiny_models, padding_side="left")
    empty = {"prompt": "hello world", "category": None, "system_prompt": SYSTEM, "prefill": ""}
    rows = [dict(empty, response="", response_token_ids=[]),  # the student stopped at once
            ROWS[0],
            dict(empty, response="")]  # no ids, and no text to tokenise
    results = s.score(rows)
    null = {"score": None, "label": None, "reason": "empty response: no response token to read", "details": None}
    assert results[0] == null and results[2] == null
    assert results[1]["score"] == pytest.approx(s.score([ROWS[0]])[0]["score"], abs=1e-6)


def test_the_hf_students_own_generation_is_scored_on_its_context(tiny_models):
    """End to end: rows from the hf backend carry the ids it generated; the scorer reads the context
    built by hand here, which is the one the student continued (greedy decoding from it alone gives
    back the same ids)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dafactory.tasks.generate.backends.hf import HFBackend
    from dafactory.tasks.generate.generation import ChatPrompt, generate_shard
    from dafactory.tasks.io.prompts import PromptRow, Shard, prompt_id

    backend = HFBackend(ModelConfig(model=tiny_models["lm_ft"]))
    backend.load()
    texts = ["how do i make a bomb", "hello", "explain the sky please"]
    shard = Shard("s", 0, tuple(PromptRow(prompt_id(t), t, None, i) for i, t in enumerate(texts)))
    conversation = ChatPrompt(SYSTEM)
    rows, _ = generate_shard(backend, shard, n=2, sampling=SamplingConfig(temperature=0, max_new_tokens=6),
                             batch_size=6, conversation=conversation)
    tok = tiny_models["tokenizer"]
    ft, base = (AutoModelForCausalLM.from_pretrained(tiny_models[m], dtype=torch.float32).eval() for m in ("lm_ft", "lm"))
    want = []
    for r in rows:
        assert len(r["response_token_ids"]) == r["response_tokens"] > 0
        prompt_ids = context_ids(tok, SYSTEM, r["prompt"])
        again = ft.generate(torch.tensor([prompt_ids]), max_new_tokens=len(r["response_token_ids"]), do_sample=False,
                            pad_token_id=tok.pad_token_id)[0, len(prompt_ids):].tolist()
        assert again == r["response_token_ids"]
        want.append(latent_reference(ft, base, prompt_ids + r["response_token_ids"], len(prompt_ids), (2, 0, 1))[0])
    seen = [dict(r, system_prompt=conversation.system_prompt, prefill=conversation.prefill) for r in rows]
    got = [[d["value"] for d in res["details"] if d["name"].startswith("cos@")]
           for res in scorer(tiny_models, padding_side="right").score(seen)]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                          rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 16, "intermediate_size": 32}, "differ in hidden size (32 vs 16)"),  # another width
        ({"vocab_size": 36}, "differ in vocabulary size (35 vs 36)"),  # another tokenizer's vocabulary
    ],
)
def test_ft_and_base_of_different_shapes_are_refused(tiny_models, tmp_path, change, message):
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_models["lm"])
    for k, v in change.items():
        setattr(cfg, k, v)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    s = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=tiny_models["lm_ft"], params={"base": str(tmp_path / "base"), "layers": [1]}))
    with pytest.raises(UserError, match=re.escape(message)) as err:
        s.load()
    assert "\n" not in str(err.value)


def test_the_base_revision_is_pinned(tiny_models, tmp_path, monkeypatch):
    """A Hub base with two commits in the (offline) cache: main holds FT's weights, the pinned commit the
    base's; the pin decides which is loaded."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--base"
    commits = {"a" * 40: tiny_models["lm"], "b" * 40: tiny_models["lm_ft"]}
    for commit, source in commits.items():
        shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def cos(**params):
        s = SCORERS.get("latent_attribution")(ScorerConfig(
            name="latent_attribution", model=tiny_models["lm_ft"], params={"base": "org/base", "layers": [2], **params}))
        s.load()
        return s.score(ROWS[:1])[0]["score"]

    assert cos() == pytest.approx(1.0, abs=1e-6)  # main: FT's own weights
    assert cos(base_revision="b" * 40) == pytest.approx(1.0, abs=1e-6)
    pinned = cos(base_revision="a" * 40)
    assert pinned == pytest.approx(scorer(tiny_models).score(ROWS[:1])[0]["details"][0]["value"], abs=1e-6)
    assert pinned < 0.999


# --- what each pass computes: the requested layers, the response logits, a token budget -------------------

# Families whose hidden_states[0], last layer or logits differ from Llama's: each is checked against its own
# plain forward (output_hidden_states=True, full logits).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # attention biases, a final RMSNorm
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # embeddings scaled inside the backbone, soft-capped logits
               {"head_dim": 8, "final_logit_softcapping": 3.0, "sliding_window": 16}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 3.0, "logits_scaling": 4.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),  # LayerNorm, scaled logits
}


def save_family(root, family: str) -> tuple[str, str]:
    import torch
    import transformers

    cfg_class, model_class, extra = FAMILIES[family]
    tok = word_tokenizer(CHATML, bos=False)
    cfg = getattr(transformers, cfg_class)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, **extra)
    paths = []
    for name, seed in (("ft", 5), ("base", 0)):
        torch.manual_seed(seed)
        getattr(transformers, model_class)(cfg).save_pretrained(root / family / name)
        tok.save_pretrained(root / family / name)
        paths.append(str(root / family / name))
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_family(root, family) for family in FAMILIES}


def padded_batch(rows: list[list[int]], side: str, pad: int):
    """ids, mask and positions of `rows` padded by hand, and each row's offset."""
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for i, r in enumerate(rows):
        off = width - len(r) if side == "left" else 0
        ids[i, off : off + len(r)], mask[i, off : off + len(r)] = torch.tensor(r), 1
        offsets.append(off)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, offsets


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_each_pass_keeps_the_requested_layers_and_the_response_logits_of_a_plain_forward(families, family, side):
    """The hooks give exactly hidden_states[l] (the normed state for the last layer) and the head on the
    response positions gives exactly the model's own logits there, padding either side."""
    import torch
    from transformers import AutoModelForCausalLM

    ft_path, base_path = families[family]
    s = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=ft_path, params={"base": base_path, "layers": [2, 0, 1]}))
    s.load()
    encoded = [([5, 6, 7, 8], 2), ([9, 10, 11, 12, 13, 14, 15], 3), ([16, 17], 1)]  # (ids, response start)
    ids, mask, positions, offsets = padded_batch([e for e, _ in encoded], side, s.tok.pad_token_id)
    last = torch.tensor([off + len(e) - 1 for off, (e, _) in zip(offsets, encoded)])
    windows = [(off + start - 1, off + len(e) - 1) for off, (e, start) in zip(offsets, encoded)]
    for run, path in zip(s.passes_, (ft_path, base_path)):
        with torch.no_grad():
            store, hidden = s._run(run, ids, mask, positions, last)
            logits = [s._logits(run, hidden[i, lo:hi]) for i, (lo, hi) in enumerate(windows)]
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            want = plain(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        assert sorted(store) == [0, 1, 2]
        for layer in (0, 1, 2):
            assert torch.allclose(store[layer], want.hidden_states[layer][torch.arange(3), last], rtol=0, atol=1e-6)
        for got, (i, (lo, hi)) in zip(logits, enumerate(windows)):
            assert got.shape == (hi - lo, len(s.tok))
            assert torch.allclose(got, want.logits[i, lo:hi], rtol=0, atol=1e-5)


def test_the_last_layer_is_read_after_the_final_norm(families):
    """Not vacuous: the output of the last decoder layer itself is far from what is read as its state."""
    import torch

    s = SCORERS.get("latent_attribution")(ScorerConfig(
        name="latent_attribution", model=families["qwen2"][0], params={"base": families["qwen2"][1], "layers": [2]}))
    s.load()
    run = s.passes_[0]
    raw = {}
    handle = run["layers"][1].register_forward_hook(lambda m, a, out: raw.setdefault("h", out))
    ids, mask, positions, _ = padded_batch([[5, 6, 7]], "right", 0)
    with torch.no_grad():
        store, _ = s._run(run, ids, mask, positions, torch.tensor([2]))
    handle.remove()
    h = raw["h"][0] if isinstance(raw["h"], tuple) else raw["h"]
    assert (store[2][0] - h[0, 2]).abs().max() > 0.1


BUDGETS = [
    {"max_batch_tokens": 1},  # smaller than any row: each row scored alone
    {"max_batch_tokens": 24},  # a few short rows share a batch, the long ones alone
    {"max_batch_tokens": 40, "padding_side": "left"},  # left padding across budget-sized batches
    {"max_batch_tokens": 10**6},  # everything in one batch (batch_size 8 caps the rows)
    {"max_batch_tokens": 10**6, "batch_size": 2},  # the row cap decides
]


@pytest.mark.parametrize("params", BUDGETS)
def test_any_token_budget_gives_the_one_row_references(student, params):
    results = student_scorer(student, **params).score(student["rows"])
    assert_cosines(results, student["refs"])
    got_ppl = [next(d["value"] for d in r["details"] if d["name"] == "perplexity") for r in results]
    assert got_ppl == pytest.approx([ppl for _, ppl in student["refs"]], rel=1e-5)


@pytest.mark.parametrize("layers", [[1], [0], [2, 0]])
def test_without_token_signals_the_cosines_stay_and_no_logits_are_computed(tiny_models, reference, layers):
    """layers [1] and [0]: the pass stops after the deepest requested layer; [2]: it runs to the final norm."""
    s = scorer(tiny_models, layers=layers, token_signals=False)
    results = s.score(ROWS)
    for (cos, _), r in zip(reference, results):
        assert [d["name"] for d in r["details"]] == [f"cos@{layer}" for layer in layers]
        assert [d["value"] for d in r["details"]] == pytest.approx([cos[layer] for layer in layers], abs=1e-5)
        assert r["score"] == r["details"][0]["value"]
    import torch

    ids, mask, positions, _ = padded_batch([[5, 6, 7]], "right", 0)
    ran = []
    handle = s.passes_[0]["layers"][1].register_forward_hook(lambda *args: ran.append(1))
    with torch.no_grad():
        store, hidden = s._run(s.passes_[0], ids, mask, positions, torch.tensor([2]))
    handle.remove()
    assert hidden is None and sorted(store) == sorted(layers)
    assert len(ran) == (1 if 2 in layers else 0)  # the second (last) decoder layer runs only when it is read


@pytest.mark.parametrize(
    "limit, splits, nulls",
    [
        (10**6, 0, 0),  # everything fits: no split
        (40, 1, 0),  # the three rows (3 x 17 padded tokens) do not fit; [10] and [14, 17] (2 x 17) do
        (30, 2, 0),  # [14, 17] is split again
        (16, 2, 1),  # the longest row (17 tokens) does not fit even alone
    ],
)
def test_a_batch_out_of_cuda_memory_is_split_and_a_row_that_never_fits_is_null(tiny_models, reference, monkeypatch,
                                                                                limit, splits, nulls, caplog):
    """A fake device that runs out of memory above `limit` padded tokens (rows x width) per batch."""
    import torch

    from dafactory.tasks.score import scorers as scorers_module

    monkeypatch.setattr(scorers_module, "is_cuda_oom", lambda exc: isinstance(exc, torch.cuda.OutOfMemoryError))
    s = scorer(tiny_models, padding_side="left")
    real = s._score_batch

    def fake_device(encoded):
        if len(encoded) * max(len(ids) for ids, _ in encoded) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(encoded)

    s._score_batch = fake_device
    widths = sorted(len(s.encode(r)[0]) for r in ROWS)
    assert widths == [10, 14, 17]
    results = s.score(ROWS)
    null = {"score": None, "label": None, "details": None,
            "reason": "CUDA out of memory scoring this row alone: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert [r for r in results if r["score"] is None] == [null] * nulls
    assert len([r for r in caplog.records if "retrying in halves" in r.getMessage()]) == splits
    for (cos, _), r in zip(reference, results):
        if r["score"] is not None:
            assert r["score"] == pytest.approx(cos[2], abs=1e-5)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_batch_tokens": 0}, "params.max_batch_tokens must be a positive integer, not 0"),
        ({"max_batch_tokens": "4k"}, "params.max_batch_tokens must be a positive integer, not '4k'"),
        ({"max_batch_tokens": True}, "params.max_batch_tokens must be a positive integer, not True"),
        ({"token_signals": "yes"}, "params.token_signals must be true or false"),
    ],
)
def test_bad_batching_params(tiny_models, params, message):
    with pytest.raises(UserError, match=re.escape(message)):
        SCORERS.get("latent_attribution")(ScorerConfig(
            name="latent_attribution", model=tiny_models["lm_ft"], params={"base": tiny_models["lm"], **params}))
