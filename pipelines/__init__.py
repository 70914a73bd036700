"""diffusers integration: patch / unpatch, model adapters, our attention backend, tiny pipelines."""

from .adapters import ADAPTERS, adapter_for
from .backend import register_backend
from .patch import patch, patch_state, unpatch
from .tiny import TINY_FAMILIES, build_tiny_pipeline, supported_models, tiny_defaults

__all__ = ["patch", "unpatch", "patch_state", "adapter_for", "ADAPTERS", "build_tiny_pipeline", "tiny_defaults", "TINY_FAMILIES",
           "supported_models"]

# "vdit" in diffusers' attention registry from import on, so that
# transformer.set_attention_backend("vdit") works without patch() (dense, our kernel).
register_backend()
