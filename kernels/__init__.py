"""Triton kernels and their thin launchers: tensors and constexprs in, tensors out (imports torch and
triton only).

This folder installs as ``vdit_accel.kernels``. Its bare name belongs to Hugging Face's ``kernels``
distribution, which transformers (>= 5.25) imports; where the checkout root is on ``sys.path`` (any
``python -m`` or ``python -c`` run from it) ``import kernels`` would find this folder instead, so
imported under that name it hands the name over to the installed distribution and defines nothing.
"""

import os
import sys


def _hand_over_the_name() -> None:
    """Replace this module in ``sys.modules["kernels"]`` by the ``kernels`` package found on
    ``sys.path`` without the checkout root; where none is installed, leave this module empty (no
    ``__version__``, so transformers reads the distribution as absent)."""
    import importlib.machinery
    import importlib.util

    root = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds after this
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise


if __name__ == "kernels":
    _hand_over_the_name()
else:
    import torch

    from .attention_fwd import attention_fwd

    def use_triton(x: torch.Tensor) -> bool:
        """Whether the kernels run on ``x``'s device: CUDA, or the CPU under Triton's interpreter when
        asked for (``TRITON_INTERPRET=1`` and ``VDIT_CPU_TRITON=1``: the tests); elsewhere callers take
        their PyTorch paths."""
        if x.device.type == "cuda":
            return True
        return (
            x.device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET") == "1"
            and os.environ.get("VDIT_CPU_TRITON") == "1"
        )

    __all__ = ["attention_fwd", "use_triton"]
