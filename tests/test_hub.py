"""Finding a model: local folders as they are, hub ids fetched, clear errors otherwise."""

import pytest

from molmoe_lite.hub import ModelNotFoundError, resolve_model


def test_local_folder_is_used_as_is(tmp_path):
    assert resolve_model(tmp_path) == tmp_path


def test_a_file_is_not_a_model_folder(tmp_path):
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(f)


@pytest.mark.parametrize("name", ["./no-such-folder", "a/b/c", "not a hub id"], ids=["relative", "deep", "spaces"])
def test_missing_folder_that_is_no_hub_id(name):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model(name)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="could not fetch"):
        resolve_model("allenai/MolmoE-1B-0924")
