"""Deploy targets as a dimension of the ladder: every variant evaluated on each target of the
run, one gate decision per target, a bundle per released variant with a validation record
per target, and verify choosing the record of the target it runs on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, copy_project, quantbuild, small_project
from test_evaluation import BASE, GATE, RECORDS, metrics, paired
from quantbuild.errors import GateError
from quantbuild.gate import released, require_release, select_targets

CPU, CUDA = "llama.cpp-cpu", "llama.cpp-cuda"


def _on(target: str, measured: dict) -> dict:
    return {**measured, "target": target}


def test_the_gate_decides_per_target_on_each_targets_own_measurements():
    # int4 is the smallest that passes on the CPU; on the GPU it decodes slower than the
    # baseline there (as Q3_K_S and Q6_K do on an H200), so the GPU keeps int8.
    cpu = {"int8": metrics(2.0, 0.001), "int4": metrics(2.05, 0.01)}
    cuda = {"int8": metrics(2.0, 0.001, ratio=(0.8, 0.78, 0.83)), "int4": metrics(2.05, 0.01, ratio=(1.3, 1.25, 1.36))}
    decision = select_targets({CPU: (_on(CPU, BASE), {name: _on(CPU, value) for name, value in cpu.items()}),
                               CUDA: (_on(CUDA, BASE), {name: _on(CUDA, value) for name, value in cuda.items()})},
                              RECORDS, GATE)
    assert released(decision) == {CPU: "int4", CUDA: "int8"}
    # the primary (first) target's decision is the top level, as before targets
    assert decision["chosen"] == "int4" and decision["target"] == CPU
    assert decision["targets"][CUDA]["variants"]["int4"]["reason"].startswith("no operational win: latency_ratio")
    assert require_release(decision) == "int4"


def test_a_measurement_from_another_target_is_not_validation_there():
    cuda = {"int4": _on(CPU, metrics(2.05, 0.01))}  # measured on the CPU, filed under the GPU
    decision = select_targets({CUDA: (_on(CUDA, BASE), cuda)}, RECORDS, GATE)
    check = decision["variants"]["int4"]["checks"][0]
    assert (check["budget"], check["pass"], check["measured"], check["limit"]) == \
        ("validated_on_target", False, CPU, CUDA)
    assert decision["variants"]["int4"]["reason"] == f"not validated on its target: measured on {CPU}, ships for {CUDA}"


def test_nothing_released_on_one_target_fails_the_gate_naming_it():
    from dataclasses import replace

    cpu = {"int4": _on(CPU, metrics(2.05, 0.01))}
    slow = {"int4": _on(CUDA, metrics(2.05, 0.01, ratio=(1.4, 1.3, 1.5)))}
    decision = select_targets({CPU: (_on(CPU, BASE), cpu), CUDA: (_on(CUDA, BASE), slow)}, RECORDS,
                              replace(GATE, fallback="none"))
    assert released(decision) == {CPU: "int4", CUDA: None}
    with pytest.raises(GateError) as err:
        require_release(decision)
    assert str(err.value).splitlines()[0] == ("release gate: no variant passes every check on llama.cpp-cuda, and no "
                                              "baseline-precision fallback (gate.fallback=none)")
    assert "int4: latency_ratio" in str(err.value)


def _params(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())


def test_every_variant_is_a_stage_on_every_target(tmp_path):
    project = small_project(tmp_path)
    params = _params(project)
    params["eval"]["targets"] = [CPU, CUDA]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    listed = subprocess.run([str(BIN / "dvc"), "stage", "list", "--name-only"], cwd=project, capture_output=True,
                            text=True, check=True).stdout.split()
    evaluations = sorted(name for name in listed if name.startswith("evaluate"))
    assert evaluations == sorted([f"evaluate_baseline@{CPU}", f"evaluate_baseline@{CUDA}",
                                  *(f"evaluate@{variant}-{target}" for variant in params["quant"]["variants"]
                                    for target in (CPU, CUDA))])
    # each target's evaluations depend on its own fingerprint: a GPU driver change re-measures
    # the GPU target only
    stage = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["evaluate"]
    assert "${paths.fingerprint}/targets/${item.target}.json" in stage["deps"]


def test_a_target_this_machine_lacks_is_refused_before_any_work(tmp_path):
    from quantbuild.runtimes.llama_cpp import devices

    if "cuda" in devices():
        pytest.skip("this machine runs llama.cpp on a CUDA GPU")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["eval"]["targets"] = [CPU, CUDA]
    params["paths"] = {**params["paths"], "fingerprint": str(tmp_path / "fingerprint")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "stages.fingerprint"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"quantbuild: target {CUDA}: not available here ("), lines
    assert not (tmp_path / "fingerprint").exists()


FAKE = "a second target faked at the fingerprint level: this machine has no GPU"


@pytest.mark.slow
@pytest.mark.e2e
def test_per_target_decisions_bundles_and_verify_on_a_faked_second_target(built_project, tmp_path):
    """The CPU target as built; a second target (`llama.cpp-cuda`) faked where CI has no GPU
    (marked: FAKE): its evaluations are the CPU's re-filed under it, with the released
    variant made slower than the baseline there. select and package then run as DVC runs
    them."""
    repo = copy_project(built_project, tmp_path / "repo")
    params = _params(repo)
    params["eval"]["targets"] = [CPU, CUDA]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cpu_choice = json.loads((repo / "artifacts" / "release" / "decision.json").read_text())["chosen"]
    evaluations = repo / "artifacts" / "eval"
    shutil.copytree(evaluations / CPU, evaluations / CUDA)
    for measured in (evaluations / CUDA).glob("*/measurements.json"):
        values = json.loads(measured.read_text())
        values["target"] = CUDA
        values["fake"] = FAKE
        if measured.parent.name == cpu_choice:
            values["latency_vs_baseline"] = paired((20.0, 19.0, 21.0), (20.0, 19.0, 21.0))  # past the small gate's 10
        measured.write_text(json.dumps(values))
    fingerprints = repo / "artifacts" / "fingerprint" / "targets"
    fake = json.loads((fingerprints / f"{CPU}.json").read_text())
    (fingerprints / f"{CUDA}.json").write_text(json.dumps({**fake, "target": CUDA, "fake": FAKE}))
    for stage in ("select", "package"):
        result = subprocess.run([str(BIN / "python"), "-m", f"stages.{stage}"], cwd=repo, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    decision = json.loads((repo / "artifacts" / "release" / "decision.json").read_text())
    choices = released(decision)
    assert choices[CPU] == cpu_choice and choices[CUDA] != cpu_choice
    assert decision["targets"][CUDA]["variants"][cpu_choice]["reason"].startswith("no operational win")
    # one bundle per released variant, each holding the record and probes of its targets
    package = repo / "artifacts" / "package"
    model = params["model"]["name"]
    bundles = {choice: package / f"{model}-{choice}" for choice in choices.values()}
    assert sorted(path.name for path in package.iterdir()) == sorted(path.name for path in bundles.values())
    for target, choice in choices.items():
        manifest = json.loads((bundles[choice] / "manifest.json").read_text())
        assert manifest["validated_for"] == [target] and list(manifest["targets"]) == [target]
        assert manifest["targets"][target]["evaluation"]["variant"]["target"] == target
        assert manifest["targets"][target]["gate"]["chosen"] == choice
        assert (bundles[choice] / "targets" / target / "probes.safetensors").is_file()
        assert "probes.safetensors" not in {path.name for path in bundles[choice].iterdir()}
    # verify takes the record of the target this machine runs (its CPU) and names it ...
    cpu_bundle, cuda_bundle = bundles[choices[CPU]], bundles[choices[CUDA]]
    ok = quantbuild(repo, "verify", str(cpu_bundle), "--behaviour")
    assert ok.returncode == 0 and f"on {CPU}" in ok.stdout, ok.stderr
    # ... and refuses to call validated a bundle never measured on it
    refused = quantbuild(repo, "verify", str(cuda_bundle), "--behaviour")
    assert refused.returncode == 2
    assert f"drift: target {CPU}: validated for {CUDA} -> never measured on it" in refused.stderr
    assert json.loads(quantbuild(repo, "verify", str(cuda_bundle), "--json").stdout)["target"] == CPU
    # the decisions side by side in the summary
    summary = quantbuild(repo, "summary").stdout
    assert "decisions side by side" in summary and f"chosen for {CUDA}: {choices[CUDA]}" in summary
    assert f"chosen for {CPU}: {cpu_choice}" in summary
    # the HTML report: a section per target, each chart once on the page
    assert quantbuild(repo, "report").returncode == 0
    page = (repo / "artifacts" / "report.html").read_text()
    ids = re.findall(r'<svg id="([^"]+)"', page)
    assert len(ids) == 8 and len(set(ids)) == 8 and "pareto" in ids and f"{CUDA}-pareto" in ids
    assert f"<h2>{CPU}: released {cpu_choice}</h2>" in page and f"<h2>{CUDA}: released {choices[CUDA]}</h2>" in page


@pytest.mark.slow
@pytest.mark.e2e
def test_a_llama_cpp_evaluation_never_loads_torch(built_project, tmp_path):
    """llama.cpp's CUDA build and a CUDA build of torch crash in one process (SIGSEGV on the
    H200, bench/README.md), so nothing on the llama.cpp path loads torch: with torch made
    unimportable, the evaluate stage (baseline and a variant) gives the same quality
    numbers byte for byte, and verify --behaviour reruns a bundle's probes. Each of those
    processes loads llama.cpp's library before numpy, gguf-py and sentencepiece (each a
    native library of its own; the stage loading numpy first crashed on the H200)."""
    repo = copy_project(built_project, tmp_path / "repo")
    blocker = tmp_path / "no-torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("torch loaded by a llama.cpp process")\n')
    order = tmp_path / "order.txt"
    (blocker.parent / "sitecustomize.py").write_text(ORDER_HOOK)
    env = {**os.environ, "PYTHONPATH": str(blocker.parent), "ORDER_FILE": str(order)}
    evaluations = repo / "artifacts" / "eval" / CPU
    for name in ("baseline", "gguf_q8_0"):
        before = (evaluations / name / "quality.json").read_bytes()
        shutil.rmtree(evaluations / name)
        result = subprocess.run([str(BIN / "python"), "-m", "stages.evaluate", name, CPU], cwd=repo, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (evaluations / name / "quality.json").read_bytes() == before, name
    for bundle in (repo / "artifacts" / "package").iterdir():
        checked = subprocess.run([str(BIN / "quantbuild"), "verify", str(bundle), "--behaviour"], cwd=repo, env=env,
                                 capture_output=True, text=True)
        assert checked.returncode == 0 and f"on {CPU}" in checked.stdout, checked.stderr[-2000:]
    loaded = [line.split() for line in order.read_text().splitlines()]
    assert len(loaded) == 2 + len(list((repo / "artifacts" / "package").iterdir()))
    for names in loaded:
        assert names[0] == "llama.cpp" and {"numpy", "gguf"} <= set(names), names


# Records, in the order a process loads them, llama.cpp's library and the modules with
# native libraries of their own, into $ORDER_FILE at exit (a sitecustomize on PYTHONPATH).
ORDER_HOOK = """import atexit, os, sys
_seen = []
def _hook(event, args):
    if event == "import" and args[0] in ("numpy", "gguf", "sentencepiece", "torch") and args[0] not in _seen:
        _seen.append(args[0])
    elif event == "ctypes.dlopen" and "libllama" in str(args[0]) and "llama.cpp" not in _seen:
        _seen.append("llama.cpp")
sys.addaudithook(_hook)
atexit.register(lambda: open(os.environ["ORDER_FILE"], "a").write(" ".join(_seen) + "\\n"))
"""


@pytest.mark.slow
@pytest.mark.e2e
def test_a_ladder_change_does_not_re_evaluate_the_baseline(built_project, tmp_path):
    """The baseline's evaluation depends on the baseline GGUF and the ladder's runtime, not
    on the ladder's variants or the importance matrix."""
    repo = copy_project(built_project, tmp_path / "repo")
    params = _params(repo)
    params["quant"]["variants"].pop("gguf_q8_0")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=repo, capture_output=True, text=True)
    assert status.returncode == 0 and "select" in status.stdout, status.stdout
    assert "evaluate_baseline" not in status.stdout, status.stdout


def test_an_unknown_target_for_verify_is_one_line(tmp_path):
    result = quantbuild(tmp_path, "verify", str(tmp_path), "--target", "llama.cpp-tpu")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "quantbuild: --target llama.cpp-tpu: unknown (known: llama.cpp-cpu, llama.cpp-cuda, torch-cpu, torch-cuda)"]
