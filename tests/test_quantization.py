"""Quantizers: real GPTQModel runs on the bundled baseline, determinism, reload + generate,
and errors before any work."""

import pytest

from conftest import BASELINE, REPO
from quantbuild.calibration import compose_calibration, load_calibration
from quantbuild.config import CalibrationConfig, VariantConfig
from quantbuild.errors import ConfigError
from quantbuild.quantization import MODEL_DIR, RECORD, build_variant
from quantbuild.quantizers.gptqmodel_backend import load_quantized

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    config = CalibrationConfig(sources={"workflow_prompts": 1.0, "tool_calls": 1.0}, samples=8, seq_len=128)
    compose_calibration(config, REPO / "data" / "calibration", BASELINE, out)
    return load_calibration(out)


VARIANTS = {
    "rtn_int8": VariantConfig(method="rtn", bits=8, group_size=-1),
    "gptq_4bit_g64": VariantConfig(method="gptq", bits=4, group_size=64),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_same_inputs_give_identical_weights(name, calibration, tmp_path):
    first = build_variant(name, VARIANTS[name], BASELINE, calibration, tmp_path / "a")
    second = build_variant(name, VARIANTS[name], BASELINE, calibration, tmp_path / "b")
    assert first["files"] == second["files"]
    assert "quant_log.csv" not in first["files"]
    bits = VARIANTS[name].bits
    assert bits < first["bits_per_weight"] < bits + 0.6  # codes plus scales, zeros and g_idx
    assert (tmp_path / "a" / RECORD).is_file()


@pytest.mark.parametrize("runtime", ["kernel", "dequantized"])
def test_artifact_reloads_and_generates(calibration, tmp_path, runtime):
    import json

    from transformers import AutoTokenizer

    from quantbuild.evaluation.generation import generate_greedy

    build_variant("gptq_4bit_g64", VARIANTS["gptq_4bit_g64"], BASELINE, calibration, tmp_path / "q")
    folder = tmp_path / "q" / MODEL_DIR
    assert json.loads((folder / "quantize_config.json").read_text())["format"] == "gptq"
    model = load_quantized(folder, runtime)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    outputs = generate_greedy(model, tokenizer, ["Question: What is 21 + 14?\nAnswer:"], max_new_tokens=6)
    assert outputs[0].strip() == "35"


def test_unsupported_bits_and_group_fail_before_work(calibration, tmp_path):
    with pytest.raises(ConfigError, match="bits=5 is not supported by gptq"):
        build_variant("x", VariantConfig(method="gptq", bits=5, group_size=64), BASELINE, calibration, tmp_path / "x")
    with pytest.raises(ConfigError, match="group_size=48 is not supported"):
        build_variant("x", VariantConfig(method="rtn", bits=4, group_size=48), BASELINE, calibration, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_gptq_needs_calibration(tmp_path):
    with pytest.raises(ConfigError, match="needs calibration data"):
        build_variant("x", VariantConfig(method="gptq", bits=4, group_size=64), BASELINE, [], tmp_path / "x")
