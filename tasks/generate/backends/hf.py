"""transformers generation backend: chat template, left padding, bf16 on CUDA / float32 on CPU.

The template is applied as text and tokenised without adding special tokens again, so templates that
start with BOS do not get it twice.

params: engine ("auto": how it decodes, see engines.py: "generate", "static" or "paged"; auto picks
`generate` on CPU and `paged` on CUDA), kv_cache_memory (None: for `paged` on CUDA, the fraction of
free GPU memory its KV cache takes; transformers' default is 0.9, or 0.8 with sampling processors).
"""

from __future__ import annotations

import logging

from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.generate.backends.engines import AUTO, ENGINES, default_engine, forced_sample
from dafactory.tasks.generate.generation import Backend, BudgetForcing, Generation, Request
from dafactory.tasks.generate.models import commit_of, load_model, load_tokenizer, resolve

log = logging.getLogger(__name__)


def prompt_texts(tok, conversations: list[list[dict]], prefill: str = "") -> list[str]:
    """The text of each conversation up to where the model starts writing: the chat template with its
    generation prompt, then `prefill`. Tokenise it with `adds_special_tokens(tok)`. Scorers that must
    read the context the model generated in build it here too."""
    if not conversations:
        return []
    if tok.chat_template:
        texts = tok.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    else:
        # No template: plain concatenation, with BOS added by the tokenizer if the model uses one.
        texts = ["\n\n".join(m["content"] for m in conv) + "\n\n" for conv in conversations]
    # Some templates (newer DeepSeek-R1 distills) already open <think>: never open it twice.
    return [t if prefill and t.rstrip().endswith(prefill.strip()) else t + prefill for t in texts]


def adds_special_tokens(tok) -> bool:
    """Whether the tokenizer adds its special tokens to a prompt text: templated text already holds them."""
    return not tok.chat_template


def render_ids(tok, conversations: list[list[dict]], prefill: str = "") -> list[list[int]]:
    """Each conversation's token ids up to where the model starts writing (prompt_texts, tokenised)."""
    if not conversations:
        return []
    texts = prompt_texts(tok, conversations, prefill)
    return [list(ids) for ids in tok(texts, add_special_tokens=adds_special_tokens(tok))["input_ids"]]


def stop_ids(tok, generation_eos) -> set[int]:
    """What a model stops on: its generation config's eos_token_id (one id, a list, or None) and the
    tokenizer's EOS."""
    eos = generation_eos if isinstance(generation_eos, list) else [] if generation_eos is None else [generation_eos]
    return set(eos) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


class HFBackend(Backend):
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.model_id = cfg.model
        self.revision = cfg.revision
        self.model = self.tok = None
        self.engine = str(cfg.params.get("engine", AUTO))
        if self.engine != AUTO:
            ENGINES.check(self.engine)  # a bad name fails at preflight, before the model loads

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        resolved = resolve(self.cfg.model, self.cfg.revision, self.cfg.allow_pickle_weights)
        self.tok = load_tokenizer(resolved, self.cfg.trust_remote_code, padding_side="left")
        self.model = load_model(AutoModelForCausalLM, resolved, self.cfg.trust_remote_code)
        self.model_id = resolved.model_id
        self.revision = commit_of(self.model, resolved)
        self.eos_ids = stop_ids(self.tok, self.model.generation_config.eos_token_id)
        if self.engine == AUTO:
            self.engine = default_engine(self.model.device.type)
        log.info("loaded %s (%s) on %s, engine %s", self.model_id, self.revision, self.model.device, self.engine)

    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def render(self, conversations: list[list[dict]], prefill: str = "") -> list[list[int]]:
        return render_ids(self.tok, conversations, prefill)



    def sample(self, requests: list[Request], sampling: SamplingConfig,
               forcing: BudgetForcing | None = None) -> list[list[Generation]]:
        """Each request's samples, each bounded by the request's own max_new_tokens (the `generate` and `static`
        engines decode a call to its largest and cut each sample at its own: the same tokens, since a row's draws do
        not depend on how long the call runs); `forcing` is budget forcing (engines.forced_sample)."""
        if not requests:
            return []
        if forcing is not None:
            return forced_sample(self, requests, sampling, forcing)
        raw = ENGINES.get(self.engine)(self, requests, sampling, [r.budget(sampling) for r in requests])
        return [[self._generation(ids, len(r.prompt_ids)) for ids in samples] for r, samples in zip(requests, raw)]

    def _generation(self, ids: list[int], prompt_tokens: int) -> Generation:
        """The kept ids are those before the first EOS (pads follow it in a padded batch); decoded once."""
        stop = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        kept = ids if stop is None else ids[:stop]
        return Generation(
            text=self.tok.decode(kept, skip_special_tokens=True),
            finish_reason="length" if stop is None else "stop",
            prompt_tokens=prompt_tokens,
            response_tokens=len(kept),
            token_ids=tuple(kept),
        )
