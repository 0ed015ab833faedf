"""Generation backends, by name. Modules here import torch (and vLLM) only inside `load()`."""

from dafactory.tasks.generate.backends.fake import FakeBackend
from dafactory.tasks.generate.backends.hf import HFBackend
from dafactory.tasks.generate.backends.vllm import VLLMBackend
from dafactory.tasks.registry import Registry

BACKENDS: Registry = Registry("backend")
BACKENDS.register("fake")(FakeBackend)
BACKENDS.register("hf")(HFBackend)
BACKENDS.register("vllm")(VLLMBackend)
