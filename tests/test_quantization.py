"""Quantizers: every method really runs on the bundled baseline (GPTQModel's GPTQ, RTN and
AWQ, bitsandbytes through transformers, mixed precision), builds the same bytes twice,
reloads through the runtime users deploy with and generates; bad input fails before work."""

import json
import shutil
from dataclasses import replace

import pytest

from conftest import BASELINE, REPO
from quantbuild.calibration import compose_calibration, load_calibration
from quantbuild.config import (AwqConfig, BnbConfig, CalibrationConfig, DenseConfig, GptqConfig, MixedConfig,
                               OverrideConfig, RtnConfig, SensitivityConfig)
from quantbuild.errors import ConfigError
from quantbuild.quantization import MODEL_DIR, RECORD, build_variant
from quantbuild.quantizers import Inputs, model_layers
from quantbuild.runtimes.gptqmodel_loader import kernel_names
from quantbuild.runtimes.torch_stack import TorchRuntime, load_checkpoint
from quantbuild.quantizers.mixed import plan_bits_per_weight
from quantbuild.sensitivity import load_sensitivity, write_sensitivity

pytestmark = pytest.mark.slow

PROMPT = "Question: What is 21 + 14?\nAnswer:"


CALIBRATION = CalibrationConfig(sources={"workflow_prompts": 1.0, "tool_calls": 1.0}, samples=8, seq_len=128,
                                sensitivity=SensitivityConfig(samples=2, family_tokens=256))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    compose_calibration(CALIBRATION, REPO / "data" / "calibration", BASELINE, out)
    return out


@pytest.fixture(scope="module")
def inputs(calibrated):
    return Inputs(BASELINE, load_calibration(calibrated))


@pytest.fixture(scope="module")
def sensitivity(calibrated, tmp_path_factory):
    """The sensitivity stage's tables for the planned variants below (GPTQModel at 3-bit g64
    and 8-bit g128, the two levels mixed_auto chooses between)."""
    out = tmp_path_factory.mktemp("sensitivity")
    write_sensitivity(BASELINE, load_calibration(calibrated), {"mixed_auto": VARIANTS["mixed_auto"]},
                      CALIBRATION.sensitivity, None, out)
    return out


VARIANTS = {
    "rtn_int8": RtnConfig(bits=8, group_size=-1),
    "rtn_4bit_g32_asym": RtnConfig(bits=4, group_size=32, sym=False),
    "gptq_4bit_g64": GptqConfig(bits=4, group_size=64),
    "gptq_4bit_g128_actorder_asym": GptqConfig(bits=4, group_size=128, sym=False, desc_act=True),
    "awq_4bit_g64": AwqConfig(bits=4, group_size=64, sym=False),
    "bnb_nf4_dq": BnbConfig(bits=4, group_size=64, quant_type="nf4", double_quant=True),
    "bnb_fp4": BnbConfig(bits=4, group_size=64, quant_type="fp4"),
    "bnb_int8": BnbConfig(bits=8, group_size=-1),
    "mixed_overrides": MixedConfig(bits=4, group_size=128, overrides=[
        OverrideConfig(pattern=r"model\.layers\.(0|7)\.mlp\.down_proj", bits=8, group_size=128)]),
    "mixed_auto": MixedConfig(bits=3, group_size=64, target_bits=3.6, promote_bits=8, promote_group_size=128),
}


@pytest.fixture(scope="module")
def built(inputs, sensitivity, tmp_path_factory):
    """Each variant built once (lazily), shared by the tests below."""
    root = tmp_path_factory.mktemp("built")
    records = {}

    def get(name):
        if name not in records:
            with_table = replace(inputs, sensitivity=load_sensitivity(sensitivity, name))
            records[name] = build_variant(name, VARIANTS[name], with_table, root / name)
        return records[name], root / name / MODEL_DIR

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_same_inputs_give_identical_weights(name, inputs, sensitivity, built, tmp_path):
    first, _ = built(name)
    second = build_variant(name, VARIANTS[name], replace(inputs, sensitivity=load_sensitivity(sensitivity, name)),
                           tmp_path / "again")
    assert first["files"] == second["files"]
    assert "quant_log.csv" not in first["files"]
    assert (tmp_path / "again" / RECORD).is_file()
    nominal = first["nominal_bits"]
    assert nominal < first["bits_per_weight"] < nominal + 0.75  # codes plus scales, zeros, g_idx, absmax
    if VARIANTS[name].method in ("rtn", "gptq", "mixed"):
        # GPTQ format: exactly what the planner's formula says the codes, scales, zeros and g_idx take.
        plan = {layer: {"bits": p["bits"], "group_size": p["group_size"]} for layer, p in first["layers"].items()}
        assert abs(plan_bits_per_weight(plan, model_layers(BASELINE)) - first["bits_per_weight"]) < 1e-3
    assert len(first["layers"]) == 56 and first["libraries"]["gptqmodel"] and first["size_bytes"] > 0


@pytest.mark.parametrize("name", list(VARIANTS))
def test_artifact_reloads_through_its_runtime_and_generates(name, built):
    from transformers import AutoTokenizer

    _, folder = built(name)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    runtimes = ["kernel"] if VARIANTS[name].method == "bnb" else ["kernel", "dequantized"]
    for runtime in runtimes:
        model = load_checkpoint(folder, runtime)
        assert TorchRuntime(model, tokenizer).complete([PROMPT], max_new_tokens=6)[0].text.strip() == "35", (name, runtime)
        # what the evaluation records as the kernels that ran: the quantized layers' classes,
        # none on the dequantized runtime (float32 Linear layers)
        kernels = kernel_names(model)
        if runtime == "dequantized":
            assert kernels == [], name
        else:
            assert kernels and all(kernel.endswith(("Linear", "Linear4bit", "Linear8bitLt")) for kernel in kernels), \
                (name, kernels)


def test_checkpoints_declare_their_format(built):
    gptq = json.loads((built("gptq_4bit_g64")[1] / "quantize_config.json").read_text())
    assert (gptq["quant_method"], gptq["format"], gptq["bits"], gptq["group_size"]) == ("gptq", "gptq", 4, 64)
    awq = json.loads((built("awq_4bit_g64")[1] / "quantize_config.json").read_text())
    assert (awq["quant_method"], awq["format"], awq["bits"]) == ("awq", "gemm", 4)
    nf4 = json.loads((built("bnb_nf4_dq")[1] / "config.json").read_text())["quantization_config"]
    assert nf4["quant_method"] == "bitsandbytes" and nf4["bnb_4bit_quant_type"] == "nf4"
    assert nf4["bnb_4bit_use_double_quant"] is True
    int8 = json.loads((built("bnb_int8")[1] / "config.json").read_text())["quantization_config"]
    assert int8["load_in_8bit"] is True


def test_bnb_artifact_loads_without_the_original_weights(built, tmp_path):
    from transformers import AutoModelForCausalLM

    _, folder = built("bnb_nf4_dq")
    alone = tmp_path / "alone"
    shutil.copytree(folder, alone)
    model = AutoModelForCausalLM.from_pretrained(str(alone), device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"


def test_dense_variant_is_the_baseline_at_float16_and_computes_what_it_computes(inputs, tmp_path):
    """What a torch ladder keeps when nothing wins: the baseline's weights as float16
    safetensors (16 bits per weight, the same bytes twice), loading without any quantization
    library and giving the baseline's logits; a dtype it cannot store is one line, no work."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = build_variant("dense_f16", DenseConfig(), inputs, tmp_path / "a")
    second = build_variant("dense_f16", DenseConfig(), inputs, tmp_path / "b")
    assert first["files"] == second["files"] and first["bits_per_weight"] == first["nominal_bits"] == 16.0
    assert first["target"] == "transformers"
    folder = tmp_path / "a" / MODEL_DIR
    assert not (folder / "quantize_config.json").exists()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer([PROMPT], return_tensors="pt").input_ids
    baseline = AutoModelForCausalLM.from_pretrained(str(BASELINE), dtype=torch.float32).eval()
    dense = load_checkpoint(folder, "kernel")
    with torch.inference_mode():
        assert torch.equal(dense(ids).logits, baseline(ids).logits)
    assert kernel_names(dense) == []
    with pytest.raises(ConfigError) as err:
        build_variant("x", DenseConfig(dtype="float8"), inputs, tmp_path / "x")
    assert str(err.value) == ("params.yaml: quant.variants.x.dtype='float8' is not supported by dense "
                              "(allowed: float16 | bfloat16)")
    assert not (tmp_path / "x").exists()


def test_mixed_overrides_give_the_matched_layers_their_precision(built):
    record, folder = built("mixed_overrides")
    layers = record["layers"]
    assert {name for name, layer in layers.items() if layer["bits"] == 8} == {
        "model.layers.0.mlp.down_proj", "model.layers.7.mlp.down_proj"}
    assert layers["model.layers.3.mlp.down_proj"]["bits_per_weight"] < 4.5 < layers["model.layers.0.mlp.down_proj"]["bits_per_weight"]
    dynamic = json.loads((folder / "quantize_config.json").read_text())["dynamic"]
    assert sorted(value["bits"] for value in dynamic.values()) == [8, 8]


def test_mixed_auto_promotes_sensitive_layers_within_the_target(built, sensitivity):
    record, _ = built("mixed_auto")
    table = load_sensitivity(sensitivity, "mixed_auto")
    layers = model_layers(BASELINE)
    promoted = [name for name, layer in record["layers"].items() if layer["reason"].startswith("promoted")]
    assert promoted and all(record["layers"][name]["bits"] == 8 for name in promoted)
    assert record["bits_per_weight"] <= 3.6
    # The planner's bits are exactly what GPTQModel stored (measured equals planned to 1e-3).
    assert abs(record["planned_bits_per_weight"] - record["bits_per_weight"]) < 1e-3
    plan = {name: {"bits": layer["bits"], "group_size": layer["group_size"]} for name, layer in record["layers"].items()}
    assert abs(plan_bits_per_weight(plan, layers) - record["bits_per_weight"]) < 1e-3
    # Measured at both real GPTQ levels: the layer with the most KL removed per stored bit is promoted.
    kld = table["layers"]
    gain = {name: (kld[name]["kld"]["3b-g64"]["calibration"] - kld[name]["kld"]["8b-g128"]["calibration"])
            / kld[name]["weights"] for name in kld}
    assert max(gain, key=gain.get) in promoted
    assert table["candidates"] == ["3b-g64", "8b-g128"]
    assert record["sensitivity_sha256"] == table["sha256"]


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (GptqConfig(bits=5, group_size=64), "bits=5 is not supported by gptq (allowed: 2, 3, 4, 8)"),
        (RtnConfig(bits=4, group_size=48), "group_size=48 is not supported by rtn"),
        (AwqConfig(bits=3, group_size=64), "bits=3 is not supported by awq (allowed: 4)"),
        (AwqConfig(bits=4, group_size=-1), "group_size=-1 is not supported by awq"),
        (BnbConfig(bits=4, group_size=128), "group_size=128 is not supported by bnb at 4 bits (allowed: 64)"),
        (BnbConfig(bits=4, group_size=64, quant_type="int4"), "quant_type='int4' is not supported by bnb"),
        (BnbConfig(bits=8, group_size=-1, double_quant=True), "double_quant=True is not supported by bnb at 8 bits"),
        (BnbConfig(bits=2, group_size=64), "bits=2 is not supported by bnb (allowed: 4, 8)"),
        (MixedConfig(bits=4, group_size=64), "a mixed variant needs overrides, target_bits > 0, or both"),
        (MixedConfig(bits=4, group_size=64, overrides=[OverrideConfig(pattern=r"model\.layers\.9\..*")]),
         r"overrides[0].pattern='model\\.layers\\.9\\..*' matches no layer"),
        (MixedConfig(bits=4, group_size=64, overrides=[OverrideConfig(pattern="(")]),
         "overrides[0].pattern='(' is not a valid regular expression"),
        (MixedConfig(bits=4, group_size=64, overrides=[OverrideConfig(pattern=".*q_proj", bits=6)]),
         "overrides[0].bits=6 is not supported by mixed"),
        (MixedConfig(bits=3, group_size=64, target_bits=3.0),
         "target_bits=3.0 is below the 3.3"),
        (MixedConfig(bits=4, group_size=64, target_bits=4.5, promote_bits=3),
         "promote_bits=3 is not allowed"),
    ],
)
def test_bad_variants_fail_before_any_work(variant, message, inputs, sensitivity, tmp_path):
    with pytest.raises(ConfigError) as err:
        build_variant("x", variant, replace(inputs, sensitivity=load_sensitivity(sensitivity, "mixed_auto")),
                      tmp_path / "x")
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()


def test_auto_mixed_without_sensitivity_fails_before_work(inputs, sensitivity, tmp_path):
    variant = MixedConfig(bits=3, group_size=64, target_bits=3.6)
    with pytest.raises(ConfigError, match="target_bits=3.6 needs the per-layer sensitivity"):
        build_variant("x", variant, Inputs(BASELINE, inputs.calibration, None), tmp_path / "x")
    # A table measured at other levels is refused, naming the level that is missing.
    other = MixedConfig(bits=3, group_size=64, target_bits=3.6, promote_bits=4, promote_group_size=64)
    with pytest.raises(ConfigError, match="4b-g64 was not measured"):
        build_variant("x", other, replace(inputs, sensitivity=load_sensitivity(sensitivity, "mixed_auto")),
                      tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("variant", [GptqConfig(bits=4, group_size=64), AwqConfig(bits=4, group_size=64),
                                     MixedConfig(bits=4, group_size=64, overrides=[OverrideConfig(pattern=".*q_proj")])],
                         ids=lambda variant: variant.method)
def test_methods_that_need_calibration_refuse_an_empty_set(variant, tmp_path):
    with pytest.raises(ConfigError, match=f"method {variant.method} needs calibration data"):
        build_variant("x", variant, Inputs(BASELINE, []), tmp_path / "x")


def _random_llama(folder, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                "num_attention_heads": 4, "num_key_value_heads": 4, **overrides}
    config = LlamaConfig(**settings)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASELINE / name, folder / name)
    return folder


def test_group_size_that_does_not_divide_a_layer_fails_before_work(inputs, tmp_path):
    model = _random_llama(tmp_path / "odd", intermediate_size=96)
    variant = GptqConfig(bits=4, group_size=64)
    with pytest.raises(ConfigError, match="group_size=64 does not divide model.layers.0.mlp.down_proj input width 96"):
        build_variant("x", variant, Inputs(model, inputs.calibration), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_architecture_the_library_does_not_support_fails_before_work(inputs, tmp_path):
    model = _random_llama(tmp_path / "arch")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "weird_lm"}))
    with pytest.raises(ConfigError, match="model_type='weird_lm' is not supported by gptq"):
        build_variant("x", VARIANTS["gptq_4bit_g64"], Inputs(model, inputs.calibration), tmp_path / "x")
    with pytest.raises(ConfigError, match="model_type='weird_lm' is not supported by bnb"):
        build_variant("x", VARIANTS["bnb_nf4_dq"], Inputs(model, inputs.calibration), tmp_path / "x")
    assert not (tmp_path / "x").exists()
