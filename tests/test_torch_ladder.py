"""A torch ladder whose quantized variants show no win keeps the higher-precision format:
`dense_f16` (the baseline's float16 weights, measured on the same runtime) is released at
baseline precision, packaged and verified, as gguf_f16 is on the llama.cpp ladder.
Before `dense`, such a ladder ended in select with "no baseline-precision fallback"."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import BIN, REPO, run, small_project
from quantbuild.config import compose

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

def test_a_torch_ladder_without_a_passing_variant_releases_its_dense_float16_variant(tmp_path):
    pytest.importorskip("bitsandbytes")
    repo = small_project(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    ladder = compose(REPO / "conf", ["quant=cuda"])["quant"]["variants"]
    params["quant"]["variants"] = {name: ladder[name] for name in ("dense_f16", "bnb_nf4")}
    params["eval"]["targets"] = ["torch-cpu"]
    # NF4 changes the distribution (KLD > 0) and the float16 copy does not: a quality budget
    # of zero fails the quantized variant for certain, and no noise decides this test.
    params["gate"]["max_kld_mean"] = 0.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result = run(repo, str(BIN / "dvc"), "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    decision = json.loads((repo / "artifacts" / "release" / "decision.json").read_text())
    assert decision["chosen"] == "dense_f16" and decision["fell_back"]
    dense = decision["variants"]["dense_f16"]
    assert dense["baseline_precision"] and dense["bits_per_weight"] == 16.0 and dense["target"] == "transformers"
    assert dense["reason"].startswith("released at baseline precision")
    assert not decision["variants"]["bnb_nf4"]["pass"] and not decision["variants"]["bnb_nf4"]["baseline_precision"]
    # measured on the ladder's runtime like any variant: the same numbers as the baseline
    metrics = json.loads((repo / "artifacts" / "eval" / "torch-cpu" / "dense_f16" / "metrics.json").read_text())
    assert metrics["kld_mean"] == pytest.approx(0.0, abs=1e-9)

    bundle = repo / "artifacts" / "package" / "workflow-llama-8m-dense_f16"
    assert (bundle / "model.safetensors").is_file()
    card = (bundle / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in card
    verified = run(repo, str(BIN / "quantbuild"), "verify", str(bundle))
    assert verified.returncode == 0, verified.stdout + verified.stderr
