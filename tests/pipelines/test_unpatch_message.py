"""unpatch() on something not patched names it."""

import pytest

from vdit_accel.pipelines import build_tiny_pipeline, unpatch


def test_unpatch_unpatched_names_the_model():
    pipe = build_tiny_pipeline("wan")
    with pytest.raises(RuntimeError, match="WanPipeline's WanTransformer3DModel is not patched by vdit-accel"):
        unpatch(pipe)
    with pytest.raises(RuntimeError, match="^WanTransformer3DModel is not patched"):
        unpatch(pipe.transformer)
