"""A checkpoint's weight files are named from its listing and index alone (``osd_core.weight_files``)."""

from __future__ import annotations

import json

import pytest

from osd_core.byte_source import LocalDirectory
from osd_core.errors import CheckpointError
from osd_core.weight_files import INDEX_FILE, local_shards, weight_files


def test_the_index_names_the_shards_and_stray_weight_files_are_not_among_them(tmp_path):
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "old.safetensors"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {
        "a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
        "c": "model-00001-of-00002.safetensors"}}))
    assert local_shards(tmp_path) == [tmp_path / "model-00001-of-00002.safetensors",
                                      tmp_path / "model-00002-of-00002.safetensors"]


def test_an_index_naming_a_path_outside_the_directory_is_refused(tmp_path):
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    source = LocalDirectory(tmp_path)
    with pytest.raises(CheckpointError, match="must be a plain file name"):
        weight_files(source, source.list())
    assert local_shards(tmp_path) == []  # work ahead reports nothing: the real open does


def test_pickles_only_are_refused_with_the_reason(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    source = LocalDirectory(tmp_path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        weight_files(source, source.list())


def test_a_directory_that_does_not_exist_has_no_shards(tmp_path):
    assert local_shards(tmp_path / "absent") == []
