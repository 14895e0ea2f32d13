"""fetch: pins enforced file by file, on the bytes copied; a bad source never replaces a good
baseline and leaves nothing behind."""

import shutil

import pytest

from conftest import BASELINE
from quantbuild.config import ModelConfig
from quantbuild.errors import IntegrityError
from quantbuild.hashing import digest_tree, sha256_file
from quantbuild.sources import RECORD, fetch


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "source"
    shutil.copytree(BASELINE, folder)
    return folder


def model_for(folder, **extra) -> ModelConfig:
    return ModelConfig(name="m", source="path", path=str(folder), files=digest_tree(folder), **extra)


def test_fetch_copies_pinned_files(source, tmp_path):
    record = fetch(model_for(source), tmp_path / "out")
    assert digest_tree(source).items() <= digest_tree(tmp_path / "out").items()
    assert (tmp_path / "out" / RECORD).is_file() and record["files"] == digest_tree(source)


def test_mismatch_names_file_and_digests_and_keeps_previous_output(source, tmp_path):
    model = model_for(source)
    out = tmp_path / "out"
    fetch(model, out)
    before = digest_tree(out)
    with (source / "config.json").open("a") as handle:
        handle.write(" ")
    with pytest.raises(IntegrityError) as err:
        fetch(model, out)
    message = str(err.value)
    assert message.startswith("config.json: sha256 mismatch")
    assert model.files["config.json"] in message and sha256_file(source / "config.json") in message
    assert digest_tree(out) == before
    # files are checked as they are copied: the copies made before the bad one are gone too
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "source"]


def test_pickle_weights_refused_unless_allowed(source, tmp_path):
    (source / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(IntegrityError, match="pickle weights"):
        fetch(model_for(source), tmp_path / "out")
    fetch(model_for(source, allow_pickle=True), tmp_path / "out")
    assert (tmp_path / "out" / "pytorch_model.bin").is_file()


def test_malformed_safetensors_refused_even_when_pinned(source, tmp_path):
    (source / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(IntegrityError, match="not a valid safetensors file"):
        fetch(model_for(source), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file_and_missing_folder(source, tmp_path):
    model = model_for(source)
    (source / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match="tokenizer.json: pinned file missing"):
        fetch(model, tmp_path / "out")
    with pytest.raises(IntegrityError, match="folder not found"):
        fetch(model_for(source).__class__(name="m", source="path", path=str(tmp_path / "nope"),
                                          files={"a": "0" * 64}), tmp_path / "out")


def test_a_pinned_config_json_that_is_not_a_model_config_is_refused_at_fetch(source, tmp_path):
    (source / "config.json").write_text("{not json")
    with pytest.raises(IntegrityError, match=r"config.json: not valid JSON"):
        fetch(model_for(source), tmp_path / "out")
    (source / "config.json").write_text("[1, 2]")
    with pytest.raises(IntegrityError, match=r"config.json: not a model config"):
        fetch(model_for(source), tmp_path / "out")
    assert not (tmp_path / "out").exists()
