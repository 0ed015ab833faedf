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

Each pass runs the model's backbone only and keeps only what the signals read: hooks on the decoder layers
take hidden_states[l] of the last token for the requested layers (the input of layer 0 for l = 0, the
output of layer l otherwise, and for the last layer the normed state, as transformers' `hidden_states`
gives it), and the output head runs on the response positions alone. Without token signals
(`params.token_signals: false`) no logits are computed, and the pass stops after the deepest requested
layer. Batches hold rows of similar length up to a token budget; a batch that runs out of CUDA memory is
split in halves, and a row that does not fit alone gets a null score with the reason.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

from dafactory.tasks.config import ScorerConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.generate.backends.hf import render_ids
from dafactory.tasks.generate.generation import messages
from dafactory.tasks.score.scorers import (
    SCORERS,
    Scorer,
    default_max_batch_tokens,
    max_batch_tokens_param,
    split_on_oom,
    token_batches,
)

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
    ("right" or "left"), token_signals (default true: the KL, perplexity and self-certainty details;
    false: the cosines only, without logits), max_batch_tokens (padded tokens per batch, default 16384
    on CUDA, 4096 on CPU; `batch_size` caps the rows). Rows may carry `system_prompt`, `prefill` and
    `response_token_ids` (see above)."""

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
        self.token_signals = p.get("token_signals", True)
        if not isinstance(self.token_signals, bool):
            raise UserError(f"scorer {cfg.name}: params.token_signals must be true or false")
        self.max_batch_tokens = max_batch_tokens_param(cfg)
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
        if self.max_batch_tokens is None:
            self.max_batch_tokens = default_max_batch_tokens(self.ft.device.type)
        # FT's pass, then the base's: the same weights with the adapter off, or the base model.
        self.passes_ = [self._pass(self.ft), self._pass(self.ft, adapter_off=True) if self.shared
                        else self._pass(self.base)]

    def encode(self, row: dict) -> tuple[list[int], int]:
        """Token ids of the student's context (prompt side, then response), and where the response starts."""
        conv = messages(row["prompt"], row.get("system_prompt"))
        (prompt,) = render_ids(self.tok, [conv], row.get("prefill") or "")
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

    def _pass(self, model, adapter_off: bool = False) -> dict:
        """What one forward pass runs: the backbone, its decoder layers and the output head of `model`;
        adapter_off runs a PEFT model's base weights (the adapter disabled, the head's base layer)."""
        torch = self.torch
        text_cfg = model.config.get_text_config()
        n_layers = text_cfg.num_hidden_layers
        backbone = model.get_decoder()
        layers = getattr(backbone, "layers", None)
        if not (isinstance(layers, torch.nn.ModuleList) and len(layers) == n_layers):
            layers = next((m for m in backbone.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers),
                          None)
        if layers is None:
            raise UserError(f"scorer {self.name}: no list of {n_layers} decoder layers found in {type(model).__name__}")
        head = model.get_output_embeddings()
        if adapter_off:
            # A disabled LoRA layer runs its base layer; a modules_to_save copy, the original module.
            head = getattr(head, "original_module", None) or (head.get_base_layer() if hasattr(head, "get_base_layer")
                                                              else head)
        # transformers' hidden_states[-1] is the final norm's output unless the config says otherwise.
        last_normed = getattr(text_cfg, "tie_last_hidden_states", None) is not False
        return {"model": model, "backbone": backbone, "layers": layers, "n_layers": n_layers, "head": head,
                "cfg": text_cfg, "adapter_off": adapter_off, "last_normed": last_normed}

    @contextmanager
    def _taps(self, run: dict, last, store: dict, stop_after: int | None):
        """Forward hooks that put hidden_states[l][row, last[row]] into store[l] for each requested l
        (the normed last layer excepted: the backbone's output gives it); `stop_after` ends the pass by
        raising _Stop once layer `stop_after` is read."""
        torch = self.torch
        rows = torch.arange(last.shape[0], device=last.device)
        layers, handles = run["layers"], []

        def record(layer: int, hidden) -> None:
            store[layer] = hidden[rows, last]
            if layer == stop_after:
                raise _Stop

        def before_first(module, args, kwargs):
            record(0, args[0] if args else kwargs["hidden_states"])

        def after(layer: int):
            return lambda module, args, output: record(layer, output[0] if isinstance(output, tuple) else output)

        try:
            for layer in sorted(set(self.layers)):
                if layer == 0:
                    handles.append(layers[0].register_forward_pre_hook(before_first, with_kwargs=True))
                elif layer < run["n_layers"] or not run["last_normed"]:
                    handles.append(layers[layer - 1].register_forward_hook(after(layer)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _run(self, run: dict, ids, mask, positions, last):
        """({layer: hidden state of each row's last token}, the backbone's last hidden states or None
        without token signals). The logits are taken from these row by row, to hold one row's at a time."""
        torch = self.torch
        store: dict = {}
        deepest = max(self.layers)
        needs_output = self.token_signals or (deepest == run["n_layers"] and run["last_normed"])
        stop_after = None if needs_output else deepest
        context = run["model"].disable_adapter() if run["adapter_off"] else nullcontext()
        with context, self._taps(run, last, store, stop_after):
            try:
                hidden = run["backbone"](input_ids=ids, attention_mask=mask, position_ids=positions,
                                         use_cache=False).last_hidden_state
            except _Stop:
                return store, None
        if deepest == run["n_layers"] and run["last_normed"]:
            store[deepest] = hidden[torch.arange(ids.shape[0], device=ids.device), last]
        return store, hidden if self.token_signals else None

    def _logits(self, run: dict, hidden):
        """The causal LM's logits from its last hidden states, as its forward computes them."""
        logits = run["head"](hidden)
        cfg = run["cfg"]
        if getattr(cfg, "final_logit_softcapping", None):  # Gemma 2 and 3
            logits = self.torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        if getattr(cfg, "logit_scale", None) is not None:  # Cohere
            logits = logits * cfg.logit_scale
        if getattr(cfg, "logits_scaling", None):  # Granite
            logits = logits / cfg.logits_scaling
        return logits

    def score(self, rows: list[dict]) -> list[dict]:
        # Batches of similar length waste little compute on padding; results go back in input order.
        encoded = [self.encode(r) for r in rows]
        out: list[dict | None] = [None] * len(rows)
        for i, (ids, start) in enumerate(encoded):
            if len(ids) == start:
                # The last token would be the template's, the same for every sample of the prompt.
                out[i] = {"score": None, "label": None, "reason": "empty response: no response token to read",
                          "details": None}
        todo = [i for i in range(len(rows)) if out[i] is None]
        lengths = [len(encoded[i][0]) for i in todo]
        for batch in token_batches(lengths, self.max_batch_tokens, self.cfg.batch_size):
            idx = [todo[b] for b in batch]
            results = split_on_oom(lambda sub: self._score_batch([encoded[i] for i in sub]), idx,
                                   lambda reason: {"score": None, "label": None, "reason": reason, "details": None})
            for i, result in zip(idx, results):
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
        # The true last token of each row (never a pad), and the positions whose logits predict the response.
        last = torch.tensor([off + len(row_ids) - 1 for off, (row_ids, _) in zip(offsets, encoded)])
        windows = [(off + start - 1, off + len(row_ids) - 1) for off, (row_ids, start) in zip(offsets, encoded)]
        device = self.ft.device
        ids, mask, last = ids.to(device), mask.to(device), last.to(device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        with torch.inference_mode():
            (ft_h, ft_out), (base_h, base_out) = (self._run(run, ids, mask, positions, last) for run in self.passes_)
            cosines = {layer: torch.nn.functional.cosine_similarity(ft_h[layer].float(), base_h[layer].float(), dim=-1)
                       for layer in set(self.layers)}
            if self.token_signals:
                ft_run, base_run = self.passes_
                signals = torch.stack([
                    self._token_signals(self._logits(ft_run, ft_out[i, lo:hi]),
                                        self._logits(base_run, base_out[i, lo:hi]), ids[i, lo + 1 : hi + 1])
                    for i, (lo, hi) in enumerate(windows)
                ]).tolist()
            cosines = {layer: c.tolist() for layer, c in cosines.items()}  # read back after all work is queued
        results = []
        for i in range(len(encoded)):
            details = [{"name": f"cos@{layer}", "value": cosines[layer][i]} for layer in self.layers]
            if self.token_signals:
                kl_fb, kl_bf, nll, self_certainty = signals[i]
                details += [{"name": "kl_ft_base", "value": kl_fb}, {"name": "kl_base_ft", "value": kl_bf},
                            {"name": "perplexity", "value": math.exp(nll)},
                            {"name": "self_certainty", "value": self_certainty}]
            results.append({"score": cosines[self.score_layer][i], "label": None, "reason": None, "details": details})
        return results

    def _token_signals(self, ft_logits, base_logits, targets):
        """(KL(FT || base), KL(base || FT), mean NLL under FT, self-certainty) over the response tokens, as
        one tensor (read back once per batch), from the logits of the positions that predict them. In float32,
        with few passes over the (tokens x vocabulary) values: on a GPU they cost as much as the forward."""
        torch = self.torch
        lp_ft = torch.log_softmax(ft_logits, dim=-1, dtype=torch.float32)
        lp_base = torch.log_softmax(base_logits, dim=-1, dtype=torch.float32)
        diff = lp_ft - lp_base
        # sum_v p(v) (log p(v) - log q(v)) per token, as a batched dot product: no product tensor in memory.
        kl_fb = torch.einsum("tv,tv->t", lp_ft.exp(), diff).mean()
        kl_bf = -torch.einsum("tv,tv->t", lp_base.exp(), diff).mean()
        nll = -lp_ft.gather(1, targets[:, None]).mean()
        self_certainty = -math.log(lp_ft.shape[-1]) - lp_ft.mean(dim=-1).mean()
        return torch.stack([kl_fb, kl_bf, nll, self_certainty])


class _Stop(Exception):
    """Ends a forward pass once the deepest requested layer is read, when nothing after it is needed."""
