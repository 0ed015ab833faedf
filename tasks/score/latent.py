"""The paper's Best-of-N signals from one forward pass of the aligned student (FT) and one of its base.

For each (prompt, response): the input is the context the student generated in, token for token: the
conversation (the row's `system_prompt`, then the request) through the student's chat template with its
generation prompt and the row's `prefill`, built as the hf backend builds it, then the response. The
response is the student's own token ids (`response_token_ids`) when they spell the response in the scorer's
tokenizer (the same vocabulary); otherwise the response text tokenised on its own, never together with the
prompt, which could merge a token across the boundary and shift the response window. An empty response has
no token of its own to read: its score is null with the reason. Signals, all in float32:
- cos@l: cosine between FT's and base's hidden state of the true last token at layer l (hidden_states[l],
  0 = embeddings). Unsafe responses stay closer to the base model: the paper keeps the argmin.
- kl_ft_base / kl_base_ft: mean over response tokens of KL(FT || base) and KL(base || FT).
- perplexity: exp of the mean negative log-likelihood of the response tokens under FT.
- self_certainty: mean over response tokens of KL(uniform || FT) = -log V - mean_j log p_j.

Rows are right-padded into a batch and the last real token is found from the attention mask, so no pad
position is ever read (the published code read padding for shorter rows, and took the cosine in bf16).
A PEFT/LoRA adapter as FT is loaded once: the base pass runs the same weights with the adapter disabled.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from dafactory.tasks.config import ScorerConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.generate.backends.hf import adds_special_tokens, prompt_texts
from dafactory.tasks.generate.generation import messages
from dafactory.tasks.score.scorers import SCORERS, Scorer

log = logging.getLogger(__name__)


def adapter_config(ref: str, revision: str | None = None) -> dict | None:
    """A PEFT adapter's config (local folder or Hub repo), or None if `ref` is not an adapter."""
    local = Path(ref).expanduser()
    if local.is_dir():
        cfg = local / "adapter_config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(ref, "adapter_config.json", revision=revision)).read_text())
    except Exception:  # not an adapter, not on the Hub, or offline and not cached
        return None


def adapter_base(ref: str, revision: str | None = None) -> str | None:
    """The base model named by a PEFT adapter's config, or None if `ref` is not an adapter."""
    cfg = adapter_config(ref, revision)
    return cfg.get("base_model_name_or_path") if cfg else None


@SCORERS.register("latent_attribution")
class LatentAttribution(Scorer):
    """score = cos@`params.score_layer` (default the first of `params.layers`, default [12]), lower is
    better (direction "min"); details hold cos@l for every layer and the KL, perplexity and
    self-certainty signals. params: base (the base model; read from the adapter config when `model` is
    a PEFT adapter), base_revision (pins the base's Hub revision), layers, score_layer, padding_side
    ("right" or "left"). Rows may carry `system_prompt`, `prefill` and `response_token_ids` (see above)."""

    direction = "min"

    def __init__(self, cfg: ScorerConfig):
        super().__init__(cfg)
        p = cfg.params
        self.layers = [int(x) for x in p.get("layers", [12])]
        self.score_layer = int(p.get("score_layer", self.layers[0]))
        if self.score_layer not in self.layers:
            raise UserError(f"scorer {cfg.name}: score_layer {self.score_layer} is not in layers {self.layers}")
        self.padding_side = p.get("padding_side", "right")
        if self.padding_side not in ("left", "right"):
            raise UserError(f"scorer {cfg.name}: padding_side must be 'left' or 'right'")
        if not cfg.model:
            raise UserError(f"scorer {cfg.name}: set `model` to the aligned (FT) student")
        self.adapter_base = adapter_base(cfg.model, cfg.revision)
        self.base_ref = p.get("base") or self.adapter_base
        if not self.base_ref:
            raise UserError(f"scorer {cfg.name}: set params.base to the student's base model")
        self.base_revision = p.get("base_revision")
        self.warned_foreign_ids = False

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from dafactory.tasks.generate.models import (
            adapter_source,
            device_and_dtype,
            load_model,
            load_tokenizer,
            resolve,
        )

        self.torch = torch
        cfg = self.cfg
        ft = resolve(cfg.model, cfg.revision, cfg.allow_pickle_weights)
        base = resolve(self.base_ref, self.base_revision, cfg.allow_pickle_weights)
        # The adapter's own base: one set of weights, the base pass with the adapter disabled.
        self.shared = self.adapter_base is not None and self.base_ref == self.adapter_base
        if self.shared:
            try:
                from peft import PeftModel
            except ImportError:
                raise ImportError("a PEFT adapter as model needs the peft extra: pip install 'dafactory[peft]'") from None
            device, _ = device_and_dtype()
            backbone = load_model(AutoModelForCausalLM, base, cfg.trust_remote_code)
            self.ft = PeftModel.from_pretrained(backbone, adapter_source(ft), revision=ft.revision).to(device).eval()
            self.base = None
            tok_source = ft if (Path(ft.source) / "tokenizer_config.json").exists() else base
        else:
            self.ft = load_model(AutoModelForCausalLM, ft, cfg.trust_remote_code)
            self.base = load_model(AutoModelForCausalLM, base, cfg.trust_remote_code)
            tok_source = ft
        self.tok = load_tokenizer(tok_source, cfg.trust_remote_code, padding_side=self.padding_side)
        ft_cfg = self.ft.config.get_text_config()
        n_layers = ft_cfg.num_hidden_layers
        if self.base is not None:
            # The cosine compares hidden states and the KL compares distributions position by position:
            # both need one hidden size and one vocabulary.
            base_cfg = self.base.config.get_text_config()
            for what, key in (("vocabulary size", "vocab_size"), ("hidden size", "hidden_size")):
                a, b = getattr(ft_cfg, key, None), getattr(base_cfg, key, None)
                if a != b:
                    raise UserError(f"scorer {self.name}: FT {cfg.model} and base {self.base_ref} differ in {what} "
                                    f"({a} vs {b}); the base must be the student's own base model")
            n_layers = min(n_layers, base_cfg.num_hidden_layers)
        bad = [l for l in self.layers if not 0 <= l <= n_layers]
        if bad:
            raise UserError(f"scorer {self.name}: layers {bad} outside 0..{n_layers} of {cfg.model}")
        self.vocab_size = ft_cfg.vocab_size

    def encode(self, row: dict) -> tuple[list[int], int]:
        """Token ids of the student's context (prompt side, then response), and where the response starts."""
        conv = messages(row["prompt"], row.get("system_prompt"))
        (text,) = prompt_texts(self.tok, [conv], row.get("prefill") or "")
        prompt = self.tok(text, add_special_tokens=adds_special_tokens(self.tok))["input_ids"]
        return prompt + self.response_ids(row), len(prompt)

    def response_ids(self, row: dict) -> list[int]:
        """The student's own ids when they spell the response in this tokenizer, else the response
        tokenised alone. The decode check (as the hf backend decodes) tells a shared vocabulary from
        another generator's ids, or the fake backend's, whatever the models are named."""
        ids = row.get("response_token_ids")
        if ids is None:
            return self.tok(row["response"], add_special_tokens=False)["input_ids"]
        if all(0 <= t < self.vocab_size for t in ids):
            if self.tok.decode(ids, skip_special_tokens=True) == row["response"]:
                return list(ids)
        if not self.warned_foreign_ids:
            self.warned_foreign_ids = True
            log.warning("scorer %s: response token ids that do not spell the response in %s's tokenizer "
                        "(another generator's vocabulary?): re-tokenising the response text instead",
                        self.name, self.cfg.model)
        return self.tok(row["response"], add_special_tokens=False)["input_ids"]

    def _forward(self, model, ids, mask, use_base_of_adapter: bool):
        torch = self.torch
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        if use_base_of_adapter:
            with model.disable_adapter():
                return model(**kwargs)
        return model(**kwargs)

    def score(self, rows: list[dict]) -> list[dict]:
        # Batches of similar length waste little compute on padding; results go back in input order.
        encoded = [self.encode(r) for r in rows]
        out: list[dict | None] = [None] * len(rows)
        for i, (ids, start) in enumerate(encoded):
            if len(ids) == start:
                # The last token would be the template's, the same for every sample of the prompt.
                out[i] = {"score": None, "label": None, "reason": "empty response: no response token to read",
                          "details": None}
        order = sorted((i for i in range(len(rows)) if out[i] is None), key=lambda i: len(encoded[i][0]))
        bs = self.cfg.batch_size
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            for i, result in zip(idx, self._score_batch([encoded[i] for i in idx])):
                out[i] = result
        return out

    def _score_batch(self, encoded: list[tuple[list[int], int]]) -> list[dict]:
        torch = self.torch
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tok.pad_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        offsets = []
        for i, (row_ids, _) in enumerate(encoded):
            off = width - len(row_ids) if self.padding_side == "left" else 0
            ids[i, off : off + len(row_ids)] = torch.tensor(row_ids)
            mask[i, off : off + len(row_ids)] = 1
            offsets.append(off)
        device = self.ft.device
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            ft_out = self._forward(self.ft, ids, mask, False)
            base_out = self._forward(self.ft if self.shared else self.base, ids, mask, self.shared)
        results = []
        for i, (row_ids, start) in enumerate(encoded):
            off, last = offsets[i], offsets[i] + len(row_ids) - 1  # the true last token, never a pad
            details = []
            for layer in self.layers:
                h_ft = ft_out.hidden_states[layer][i, last].float()
                h_base = base_out.hidden_states[layer][i, last].float()
                cos = torch.nn.functional.cosine_similarity(h_ft, h_base, dim=0).item()
                details.append({"name": f"cos@{layer}", "value": cos})
            details += self._token_signals(ft_out.logits[i], base_out.logits[i], row_ids, start, off)
            score = next(d["value"] for d in details if d["name"] == f"cos@{self.score_layer}")
            results.append({"score": score, "label": None, "reason": None, "details": details})
        return results

    def _token_signals(self, ft_logits, base_logits, row_ids, start, off) -> list[dict]:
        """KL both ways, perplexity and self-certainty over the response tokens (the logits at position
        t predict token t+1)."""
        torch = self.torch
        lo, hi = off + start - 1, off + len(row_ids) - 1
        lp_ft = torch.log_softmax(ft_logits[lo:hi].float(), dim=-1)
        lp_base = torch.log_softmax(base_logits[lo:hi].float(), dim=-1)
        p_ft, p_base = lp_ft.exp(), lp_base.exp()
        kl_fb = (p_ft * (lp_ft - lp_base)).sum(-1).mean().item()
        kl_bf = (p_base * (lp_base - lp_ft)).sum(-1).mean().item()
        targets = torch.tensor(row_ids[start:], device=lp_ft.device)
        nll = -lp_ft.gather(1, targets[:, None]).mean().item()
        vocab = lp_ft.shape[-1]
        self_certainty = (-math.log(vocab) - lp_ft.mean(dim=-1)).mean().item()
        return [{"name": "kl_ft_base", "value": kl_fb}, {"name": "kl_base_ft", "value": kl_bf},
                {"name": "perplexity", "value": math.exp(nll)}, {"name": "self_certainty", "value": self_certainty}]
