"""The bundled model's 4x sibling through the whole pipeline, as the default model goes: a
file of its own, so it runs on another core than the shared project's tests."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import BIN, QUANTIZED, REPO, dvc, run, small_project, stages_run
from quantbuild.config import compose

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_the_larger_sibling_runs_the_pipeline_end_to_end(tmp_path):
    """`model=workflow-llama-33m` (issue #12): the bundled 4x model goes through every stage as
    the default one does, and its bundle verifies. The shared repo's small settings and ladder;
    three timed rounds, since one round of two tokens on this larger model is all noise. (The
    planned mix's sensitivity stage alone takes minutes on it: bench/README.md measures it.)"""
    root = small_project(tmp_path / "sibling")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"] = compose(REPO / "conf", ["model=workflow-llama-33m"])["model"]
    params["eval"]["latency"].update(repeats=3)
    params["gate"]["max_latency_paired_ratio"] = 100.0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(root, "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {"fetch", "gguf_base", f"quantize@{QUANTIZED}", "evaluate_baseline", "select", "package"} <= \
        stages_run(result.stdout)
    assert "fetched workflow-llama-33m: 11 files match their pins" in result.stdout
    decision = json.loads((root / "artifacts" / "release" / "decision.json").read_text())
    assert decision["chosen"] in decision["variants"]
    bundle = root / "artifacts" / "package" / f"workflow-llama-33m-{decision['chosen']}"
    verify = run(root, str(BIN / "quantbuild"), "verify", str(bundle.relative_to(root)))
    assert verify.returncode == 0, verify.stderr
