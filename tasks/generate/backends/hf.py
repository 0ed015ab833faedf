"""transformers generation backend: chat template, left padding, bf16 on CUDA / float32 on CPU.

The template is applied as text and tokenised without adding special tokens again, so templates that
start with BOS do not get it twice.
"""

from __future__ import annotations

import logging

from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.generate.generation import Generation
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


class HFBackend:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.model_id = cfg.model
        self.revision = cfg.revision
        self.model = self.tok = None

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        resolved = resolve(self.cfg.model, self.cfg.revision, self.cfg.allow_pickle_weights)
        self.tok = load_tokenizer(resolved, self.cfg.trust_remote_code, padding_side="left")
        self.model = load_model(AutoModelForCausalLM, resolved, self.cfg.trust_remote_code)
        self.model_id = resolved.model_id
        self.revision = commit_of(self.model, resolved)
        gen_eos = self.model.generation_config.eos_token_id
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if self.tok.eos_token_id is not None:
            eos.add(self.tok.eos_token_id)
        self.eos_ids = eos
        log.info("loaded %s (%s) on %s", self.model_id, self.revision, self.model.device)

    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def _encode(self, conversations: list[list[dict]], padding: bool, prefill: str = ""):
        return self.tok(
            prompt_texts(self.tok, conversations, prefill),
            add_special_tokens=adds_special_tokens(self.tok),
            padding=padding,
            return_tensors="pt" if padding else None,
        )

    def count_prompt_tokens(self, conversations: list[list[dict]], prefill: str = "") -> list[int]:
        if not conversations:
            return []
        return [len(ids) for ids in self._encode(conversations, padding=False, prefill=prefill)["input_ids"]]

    def generate(
        self, conversations: list[list[dict]], sampling: SamplingConfig, seed: int, prefill: str = ""
    ) -> list[Generation]:
        import torch

        if not conversations:
            return []
        batch = self._encode(conversations, padding=True, prefill=prefill).to(self.model.device)
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tok.pad_token_id)
        if sampling.temperature > 0:
            kwargs.update(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0
            )
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        prompt_lens = batch["attention_mask"].sum(dim=1).tolist()
        gens = []
        for ids, plen in zip(new, prompt_lens):
            stop = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
            kept = ids if stop is None else ids[:stop]
            gens.append(
                Generation(
                    text=self.tok.decode(kept, skip_special_tokens=True),
                    finish_reason="length" if stop is None else "stop",
                    prompt_tokens=int(plen),
                    response_tokens=len(kept),
                    token_ids=tuple(kept),
                )
            )
        return gens
