"""Generation backends, by name. Modules here import torch only inside `load()`."""

from tasks.backends.fake import FakeBackend
from tasks.backends.hf import HFBackend
from tasks.registry import Registry

BACKENDS: Registry = Registry("backend")
BACKENDS.register("fake")(FakeBackend)
BACKENDS.register("hf")(HFBackend)
