from .attention_fwd import attention_fwd

__all__ = ["attention_fwd"]
