"""calibrate: seeded composition, stable digest, clear errors for missing or empty data."""

import shutil

import pytest

from conftest import BASELINE, REPO
from quantbuild.calibration import allocate, compose_calibration, load_calibration
from quantbuild.config import CalibrationConfig
from quantbuild.errors import DataError

MIX = {"workflow_prompts": 0.4, "tool_calls": 0.25, "long_context": 0.15, "domain_text": 0.2}


def test_allocation_is_proportional_and_exact():
    assert allocate(48, MIX) == {"domain_text": 10, "long_context": 7, "tool_calls": 12, "workflow_prompts": 19}
    assert sum(allocate(7, MIX).values()) == 7


def test_same_inputs_same_digest_and_seed_changes_it(tmp_path):
    config = CalibrationConfig(sources=MIX, samples=12, seq_len=128, seed=0)
    first = compose_calibration(config, REPO / "data" / "calibration", BASELINE, tmp_path / "a")
    second = compose_calibration(config, REPO / "data" / "calibration", BASELINE, tmp_path / "b")
    assert first["digest"] == second["digest"] and first["tokens_sha256"] == second["tokens_sha256"]
    config.seed = 1
    assert compose_calibration(config, REPO / "data" / "calibration", BASELINE, tmp_path / "c")["digest"] != first["digest"]
    samples = load_calibration(tmp_path / "a")
    assert len(samples) == 12 and max(map(len, samples)) <= 128


def test_text_never_enters_the_output(tmp_path):
    config = CalibrationConfig(sources={"tool_calls": 1.0}, samples=4, seq_len=64, seed=0)
    compose_calibration(config, REPO / "data" / "calibration", BASELINE, tmp_path / "out")
    stored = b"".join(path.read_bytes() for path in (tmp_path / "out").iterdir())
    assert b"Request:" not in stored and b"remind me" not in stored


def test_missing_and_empty_sources(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "calibration", data)
    config = CalibrationConfig(sources={"nope": 1.0}, samples=4, seq_len=64)
    with pytest.raises(DataError, match="nope.jsonl: calibration source not found"):
        compose_calibration(config, data, BASELINE, tmp_path / "out")
    (data / "tool_calls.jsonl").write_text("")
    config = CalibrationConfig(sources={"tool_calls": 1.0}, samples=4, seq_len=64)
    with pytest.raises(DataError, match="calibration source is empty"):
        compose_calibration(config, data, BASELINE, tmp_path / "out")
    (data / "tool_calls.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(DataError, match="tool_calls.jsonl:1: each line needs"):
        compose_calibration(config, data, BASELINE, tmp_path / "out")
    assert not (tmp_path / "out").exists()
