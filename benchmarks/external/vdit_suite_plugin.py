"""pytest plugin: run diffusers' own tests with vdit-accel active, and record what reached us.

Loaded by ``benchmarks/external/diffusers_suite.py`` (``pytest -p vdit_suite_plugin``, this folder on
``PYTHONPATH``); configured by environment variables so that one pytest command line serves every mode:

- ``VDIT_SUITE_MODE``: ``plain`` (vdit-accel not even imported: the baseline), ``dense`` (every model of
  a supported class is ``vdit_accel.patch``-ed dense when it is constructed, and diffusers' attention
  backend tests also run with the ``"vdit"`` backend) or ``sparse`` (the same, patched with
  :data:`SPARSE_STRATEGY` in blocks of :data:`SPARSE_BLOCK` tokens).
- ``VDIT_SUITE_REPORT``: a file that gets one JSON line per test: its node id, outcome, duration, the
  number of attention calls that reached vdit-accel's attention entry point (the Triton kernel on CUDA,
  its PyTorch reference on a CPU), how many of them were sparse with a mask that skips blocks, and the
  largest video token grid seen, so that a test that passes without touching us, or a sparse run whose
  grid is smaller than a block, shows as such.
- ``VDIT_SUITE_OFFLINE_HUB=1``: diffusers' pipeline tests load a few tiny tokenizers and configs from the
  Hugging Face hub (``hf-internal-testing/tiny-random-t5``, ...). On a machine without the hub (or its
  cache) they are replaced by offline stand-ins (:data:`_STANDINS`): a byte-level ``ByT5Tokenizer`` and
  small configs of our choosing. The weights the tests build from those configs are therefore not the
  ones diffusers' expected output slices were computed with: such slice checks fail in every mode,
  the plain baseline included, and the comparison of modes stays meaningful.
"""

from __future__ import annotations

import functools
import json
import os
import time

import pytest

SPARSE_STRATEGY = "window3d:t=0,h=1,w=1"
SPARSE_BLOCK = 16

MODE = os.environ.get("VDIT_SUITE_MODE", "plain")
if MODE not in ("plain", "dense", "sparse"):
    raise ValueError(f"VDIT_SUITE_MODE must be plain, dense or sparse, got {MODE!r}")

_calls = {"calls": 0, "sparse_calls": 0, "max_video_tokens": 0, "max_grid": None, "patched": 0}
_depth = [0]


# -- counting what reaches us ----------------------------------------------------------------------


def _count_calls():
    """Wrap ``vdit_accel.attention._run``: every call of :func:`vdit_accel.attention` and of a layer plan
    (``planned_attention``, what the ``vdit`` backend and the ``vdit::attention`` op run) goes through it."""
    import importlib

    from vdit_accel.pipelines import backend

    core = importlib.import_module("vdit_accel.attention")  # the package's ``attention`` is the function

    run = core._run

    @functools.wraps(run)
    def counted(q, k, v, num, idx, block_m, block_n, *args, **kwargs):
        if _depth[0] == 0:  # _run recurses once for token orders on the CPU: count the outer call
            _calls["calls"] += 1
            if num is not None:
                nb = -(-k.shape[1] // block_n)
                if int(num.min()) < nb:
                    _calls["sparse_calls"] += 1
            state = getattr(backend._running.proc, "_vdit_state", None)
            grid = getattr(state, "grid", None)
            if grid is not None and grid.video_len > _calls["max_video_tokens"]:
                _calls["max_video_tokens"], _calls["max_grid"] = grid.video_len, [grid.t, grid.h, grid.w]
        _depth[0] += 1
        try:
            return run(q, k, v, num, idx, block_m, block_n, *args, **kwargs)
        finally:
            _depth[0] -= 1

    core._run = counted


def _patch_at_construction():
    """Patch every model of a supported class when its ``__init__`` returns (also inside
    ``from_pretrained``, which constructs the model before loading its weights)."""
    import diffusers

    import vdit_accel
    from vdit_accel.pipelines import ADAPTERS

    strategy, block = ("dense", 128) if MODE == "dense" else (SPARSE_STRATEGY, SPARSE_BLOCK)
    for name in {n for a in ADAPTERS for n in a.class_names}:
        cls = getattr(diffusers, name)
        init = cls.__init__

        @functools.wraps(init)
        def patched_init(self, *args, __init=init, __cls=cls, **kwargs):
            __init(self, *args, **kwargs)
            if type(self) is __cls:  # a subclass's own __init__ may still be running
                vdit_accel.patch(self, strategy, block_size=block)
                _calls["patched"] += 1

        cls.__init__ = patched_init


def _add_vdit_backend_param():
    """diffusers' ``AttentionBackendTesterMixin`` parametrizes over a module-level list of backends (CUDA
    ones only); add ``"vdit"`` to it before the test modules are collected."""
    try:
        from tests.models.testing_utils import attention as backend_tests
    except ImportError:
        return False
    from vdit_accel.pipelines.backend import register_backend

    params = backend_tests._ALL_BACKEND_PARAMS
    if not any(getattr(p, "id", None) == "vdit" for p in params):
        params.append(pytest.param(register_backend(), id="vdit"))
    return True


# -- offline stand-ins for the hub repos diffusers' pipeline tests read -----------------------------


def _byt5(chat: bool = False):
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    if chat:  # what HunyuanVideo 1.5's Qwen2 tokenizer is asked for
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def _t5_config():
    from transformers import T5Config

    return T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=32)


def _seeded_model(cls, config):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(config).eval()


# repo id -> what each kind of from_pretrained returns for it
_STANDINS = {
    "hf-internal-testing/tiny-random-t5": {"config": _t5_config, "tokenizer": _byt5,
                                           "model": lambda cls: _seeded_model(cls, _t5_config())},
    "hf-internal-testing/tiny-random-clip": {"tokenizer": _byt5},
    "finetrainers/dummy-hunyaunvideo": {"tokenizer": _byt5},
    "hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration": {"tokenizer": lambda: _byt5(chat=True)},
}


def _install_standins():
    import transformers
    from transformers import AutoConfig, AutoTokenizer, PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    def wrap(owner, kind):
        original = owner.__dict__["from_pretrained"]
        func = original.__func__

        def from_pretrained(cls, name, *args, **kwargs):
            make = _STANDINS.get(str(name), {}).get(kind)
            if make is None:
                return func(cls, name, *args, **kwargs)
            return make(cls) if kind == "model" else make()

        setattr(owner, "from_pretrained", classmethod(functools.wraps(func)(from_pretrained)))

    wrap(AutoConfig, "config")
    wrap(AutoTokenizer, "tokenizer")
    wrap(PreTrainedTokenizerBase, "tokenizer")
    wrap(PreTrainedModel, "model")
    del transformers


# -- pytest hooks ----------------------------------------------------------------------------------


def pytest_configure(config):
    if os.environ.get("VDIT_SUITE_OFFLINE_HUB") == "1":
        _install_standins()
    if MODE != "plain":
        _count_calls()
        _patch_at_construction()


def pytest_sessionstart(session):
    session.config._vdit_backend_param = MODE != "plain" and _add_vdit_backend_param()


_current: dict = {}


def pytest_runtest_logstart(nodeid, location):
    _calls.update(calls=0, sparse_calls=0, max_video_tokens=0, max_grid=None, patched=0)
    _current.clear()
    _current.update(nodeid=nodeid, start=time.perf_counter(), outcome=None, longrepr=None)


def pytest_runtest_logreport(report):
    """A test's outcome: its first phase that did not pass (setup/teardown failures are errors)."""
    xfail = hasattr(report, "wasxfail")
    if report.passed and not xfail:
        if report.when == "call" and _current.get("outcome") is None:
            _current["outcome"] = "passed"
        return
    if _current.get("outcome") not in (None, "passed"):
        return
    if xfail:
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.skipped:
        outcome = "skipped"
    else:
        outcome = "failed" if report.when == "call" else "error"
    _current["outcome"] = outcome
    longrepr = report.longrepr
    _current["longrepr"] = longrepr[-1] if isinstance(longrepr, tuple) else report.longreprtext


def pytest_runtest_logfinish(nodeid, location):
    path = os.environ.get("VDIT_SUITE_REPORT")
    if not path or _current.get("nodeid") != nodeid:
        return
    record = {"nodeid": nodeid, "outcome": _current["outcome"],
              "seconds": round(time.perf_counter() - _current["start"], 2), **_calls,
              "message": _summary(_current.get("longrepr"))}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _summary(text: str | None) -> str | None:
    """The error line of a failure (the last ``E   `` line pytest prints), or a skip's reason."""
    if not text:
        return None
    lines = [ln[4:].strip() for ln in text.splitlines() if ln.startswith("E   ")]
    if lines:
        return next((ln for ln in lines if "Error" in ln or "Exception" in ln), lines[0])[:300]
    return text.strip().splitlines()[-1][:300]
