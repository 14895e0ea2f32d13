"""GPU paths: GPTQModel's CUDA quantization and bitsandbytes' CUDA kernels, through
quantbuild's build_variant, reloaded on the GPU and generating. Skipped without CUDA."""

import json

import pytest

from conftest import BASELINE, REPO
from quantbuild.config import BnbConfig, CalibrationConfig, GptqConfig, SensitivityConfig
from quantbuild.quantization import MODEL_DIR, build_variant
from quantbuild.quantizers import Inputs

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

PROMPT = "Question: What is 21 + 14?\nAnswer:"


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    from quantbuild.calibration import compose_calibration, load_calibration

    out = tmp_path_factory.mktemp("calibration")
    config = CalibrationConfig(sources={"workflow_prompts": 1.0, "tool_calls": 1.0}, samples=16, seq_len=256,
                               sensitivity=SensitivityConfig(samples=0))
    compose_calibration(config, REPO / "data" / "calibration", BASELINE, out)
    return load_calibration(out)


def _generate(model, folder):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to("cuda")
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_gptq_quantizes_on_the_gpu_and_reloads_with_cuda_kernels(calibration, tmp_path):
    pytest.importorskip("gptqmodel")
    from gptqmodel import GPTQModel

    variant = GptqConfig(bits=4, group_size=64)
    first = build_variant("g", variant, Inputs(BASELINE, calibration), tmp_path / "a")
    second = build_variant("g", variant, Inputs(BASELINE, calibration), tmp_path / "b")
    assert first["peak_gpu_mb"] > 0
    # Recorded, not asserted: CUDA reductions may reorder; the closing note reports the result.
    print("gptq cuda deterministic:", first["files"] == second["files"])
    folder = tmp_path / "a" / MODEL_DIR
    assert json.loads((folder / "quantize_config.json").read_text())["format"] == "gptq"
    # The Triton kernel: GPTQModel's automatic choice on Hopper (Machete) compiles at first
    # load and downloads CUTLASS for it, which an offline machine cannot.
    model = GPTQModel.load(str(folder), device="cuda", backend="gptq_triton").model.eval()
    assert _generate(model, folder).strip().startswith("35")


def test_bnb_nf4_quantizes_on_the_gpu_and_reloads(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    variant = BnbConfig(bits=4, group_size=64, quant_type="nf4", double_quant=True)
    first = build_variant("n", variant, Inputs(BASELINE, []), tmp_path / "a")
    second = build_variant("n", variant, Inputs(BASELINE, []), tmp_path / "b")
    print("bnb cuda deterministic:", first["files"] == second["files"])
    folder = tmp_path / "a" / MODEL_DIR
    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cuda").eval()
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert _generate(model, folder).strip().startswith("35")


def test_gpu_ladder_end_to_end_measures_every_variant_on_its_cuda_kernel(tmp_path):
    """`dvc repro` of `quant=cuda eval=gpu` on the bundled baseline: GPTQ and AWQ through
    GPTQModel's Triton kernels, bitsandbytes on CUDA, the baseline in float16, each measured
    on the GPU, and the kernels that ran recorded; the runtime fingerprint carries them."""
    import subprocess

    import yaml

    from conftest import small_project
    from quantbuild.config import compose

    pytest.importorskip("gptqmodel")
    pytest.importorskip("bitsandbytes")
    project = small_project(tmp_path)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["quant"]["variants"] = compose(REPO / "conf", ["quant=cuda"])["quant"]["variants"]
    params["eval"].update(targets=["torch-cuda"], runtime="kernel")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["dvc", "repro"], cwd=project, check=True)
    expected = {"baseline": [], "dense_f16": [], "bnb_int8": ["Linear8bitLt"], "gptq_4bit_g128": ["TritonV2Linear"],
                "awq_4bit_g128": ["AwqGEMMTritonLinear"], "bnb_nf4": ["Linear4bit"]}
    for name, kernels in expected.items():
        measured = json.loads((project / "artifacts" / "eval" / "torch-cuda" / name / "measurements.json").read_text())
        assert measured["torch"] == {"device": "cuda:0", "dtype": "float16", "kernels": kernels}
        assert measured["memory"]["measured"] == "allocator peak"
    runtime = json.loads((project / "artifacts" / "fingerprint" / "methods" / "ladder.runtime.json").read_text())
    assert runtime["torch_runtime"]["kernels"]["gptqmodel"] == {"awq": "awq_gemm_triton", "gptq": "gptq_triton"}
    assert set(json.loads((project / "artifacts" / "release" / "decision.json").read_text())["variants"]) == \
        set(expected) - {"baseline"}
