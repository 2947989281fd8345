"""build_model: named sizes, local folders and hub names, and one sentence for a path that is not a model."""

import pytest

from scrimp.training.models import build_model


def test_a_local_path_that_does_not_exist_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="looks like a local path, but no such directory exists"):
        build_model(str(tmp_path / "nothere"))


def test_a_folder_without_a_model_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="could not be loaded with from_pretrained"):
        build_model(str(tmp_path))


def test_an_unknown_name_is_one_sentence():
    with pytest.raises(ValueError, match="neither a known size"):
        build_model("llama_huge")
