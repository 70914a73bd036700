"""Strategy.load on files that are not strategies: each named, with what it is."""

import pickle

import pytest

from vdit_accel import Strategy


def test_binary_file_is_not_a_json_strategy(tmp_path):
    path = tmp_path / "strategy.json"
    path.write_bytes(pickle.dumps({"format": "vdit-accel-strategy", "version": 1}))
    with pytest.raises(ValueError, match=r"strategy\.json' is not a JSON strategy file \(binary data; pickles are never loaded\)"):
        Strategy.load(path)
    path.write_bytes(b'{"format": "vdit-accel-strategy"\x00}')  # valid UTF-8 with a NUL: binary too
    with pytest.raises(ValueError, match="binary data"):
        Strategy.load(path)


def test_text_that_is_not_json_says_so(tmp_path):
    path = tmp_path / "strategy.json"
    path.write_text("window3d:t=1")
    with pytest.raises(ValueError, match=r"strategy\.json' is not valid JSON"):
        Strategy.load(path)
