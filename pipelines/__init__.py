"""diffusers integration: patch / unpatch, model adapters, our attention backend, tiny pipelines."""

from .adapters import ADAPTERS, adapter_for
from .patch import patch, patch_state, unpatch
from .tiny import TINY_FAMILIES, build_tiny_pipeline, supported_models, tiny_defaults

__all__ = ["patch", "unpatch", "patch_state", "adapter_for", "ADAPTERS", "build_tiny_pipeline", "tiny_defaults", "TINY_FAMILIES",
           "supported_models"]
