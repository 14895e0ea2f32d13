"""End to end: the real `dvc repro` in a temporary git repository copied from this one.

One pipeline is built once per test session (small settings so it runs in about a
minute; `built_project`), copied here, then each test changes one thing and checks what
DVC reruns. Tests run in file order and share the copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, BUNDLE, QUANTIZED, REPO, bundle_digests, copy_project, dvc, quantbuild, run, stages_run
from quantbuild.config import compose

pytestmark = [pytest.mark.slow, pytest.mark.e2e]



@pytest.fixture(scope="module")
def repo(built_project, tmp_path_factory) -> Path:
    """A git clone-alike of this working tree, with small settings, after one full repro."""
    return copy_project(built_project, tmp_path_factory.mktemp("pipeline") / "repo")


def test_full_pipeline_packages_a_verified_bundle(repo):
    assert (repo / BUNDLE / "manifest.json").is_file()
    result = run(repo, str(BIN / "quantbuild"), "verify", BUNDLE)
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load((repo / BUNDLE / "manifest.json").read_text())
    assert set(manifest["dvc_lock"]) >= {"fetch", "calibrate", f"quantize@{QUANTIZED}", "select"}
    assert "Request:" not in (repo / BUNDLE / "manifest.json").read_text()  # digests only, never text
    compare = run(repo, str(BIN / "quantbuild"), "compare", "baseline", QUANTIZED)
    assert compare.returncode == 0 and "release gate" in compare.stdout and "structured score" in compare.stdout
    # The released bundle loads and answers its probes in its target runtime, as it did when validated.
    behaviour = run(repo, str(BIN / "quantbuild"), "verify", BUNDLE, "--behaviour")
    assert behaviour.returncode == 0 and "behavioural probes" in behaviour.stdout, behaviour.stderr
    decision = json.loads((repo / "artifacts" / "release" / "decision.json").read_text())
    assert decision["chosen"] == QUANTIZED and decision["variants"][QUANTIZED]["target"] == "llama.cpp"
    assert all(entry["reason"] for entry in decision["variants"].values())
    summary = run(repo, str(BIN / "quantbuild"), "summary")
    assert summary.returncode == 0 and "released: the smallest variant" in summary.stdout


# README commands that read a built project without changing it: each must work verbatim
# (the demo's released variant is renamed to this smaller build's).
README_SAFE = ("quantbuild verify", "quantbuild lineage", "quantbuild summary", "quantbuild compare",
               "quantbuild report", "dvc metrics show")
DEMO_RELEASED = "gguf_mix_3p5"


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    return [line for line in lines if line.startswith(README_SAFE)]


def test_readme_commands_work_as_written(repo):
    commands = readme_commands()
    assert len(commands) >= 10 and any(c.startswith("quantbuild verify artifacts/") for c in commands)
    for command in commands:
        result = run(repo, "bash", "-c", command.replace(DEMO_RELEASED, QUANTIZED))
        assert result.returncode == 0, f"README: {command}\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}"


def test_nothing_changed_runs_only_fingerprint(repo):
    result = dvc(repo, "repro", check=True)
    assert stages_run(result.stdout) == {"fingerprint"}


def test_edited_calibration_source_reruns_calibrate_and_downstream(repo):
    path = repo / "data" / "calibration" / "domain_text.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:]) + "\n")
    result = dvc(repo, "repro", check=True)
    ran = stages_run(result.stdout)
    assert {"calibrate", "imatrix", f"quantize@{QUANTIZED}"} <= ran
    # the baseline's GGUF and its evaluation read no calibration: neither reruns
    assert not ran & {"fetch", "gguf_base"} and not any(stage.startswith("evaluate_baseline") for stage in ran), ran


def test_edited_baseline_file_fails_fetch_on_its_pin(repo):
    path = repo / "data" / "baseline" / "workflow-llama-8m" / "config.json"
    original = path.read_bytes()
    before = sorted(p.name for p in (repo / "artifacts" / "baseline").iterdir())
    path.write_bytes(original.replace(b'"hidden_act": "silu"', b'"hidden_act": "gelu"'))
    try:
        result = dvc(repo, "repro")
        assert result.returncode != 0
        assert "config.json: sha256 mismatch (expected" in result.stderr + result.stdout
        assert sorted(p.name for p in (repo / "artifacts" / "baseline").iterdir()) == before
    finally:
        path.write_bytes(original)
    dvc(repo, "repro", check=True)


def test_sigkill_mid_quantize_leaves_nothing_accepted_and_next_repro_completes(repo):
    partial = repo / "artifacts" / "quantized" / f".{QUANTIZED}.partial"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    process = subprocess.Popen([str(BIN / "dvc"), "repro", "-f", "-s", f"quantize@{QUANTIZED}"], cwd=repo,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while not partial.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert partial.exists(), "quantize never started"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (repo / "artifacts" / "quantized" / QUANTIZED / "quantize_record.json").exists()
    status = dvc(repo, "status")
    assert f"quantize@{QUANTIZED}" in status.stdout
    dvc(repo, "repro", check=True)
    assert not partial.exists()  # whichever stage runs first clears a killed stage's debris
    assert run(repo, str(BIN / "quantbuild"), "verify", BUNDLE).returncode == 0


def test_concurrent_repro_gets_the_lock_error(repo):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    first = subprocess.Popen([str(BIN / "dvc"), "repro", "-f", "-s", "evaluate_baseline@llama.cpp-cpu"], cwd=repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    eval_dir = repo / "artifacts" / "eval" / "llama.cpp-cpu" / ".baseline.partial"
    deadline = time.time() + 120
    while not eval_dir.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    second = dvc(repo, "repro")
    assert first.wait() == 0
    assert second.returncode != 0
    assert "lock" in (second.stderr + second.stdout).lower()
    dvc(repo, "repro", check=True)


def test_impossible_gate_fails_with_violations_and_packages_nothing(repo):
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    # the impossible budgets over the project's gate (the evaluations' latency bound stays)
    params["gate"] = {**params["gate"], **yaml.safe_load((REPO / "conf" / "gate" / "impossible.yaml").read_text())}
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = dvc(repo, "repro")
        assert result.returncode != 0
        output = result.stderr + result.stdout
        assert "no variant passes every check" in output and "violates" in output
        assert "package" not in stages_run(result.stdout)
        decision = yaml.safe_load((repo / "artifacts" / "release" / "decision.json").read_text())
        assert decision["chosen"] is None
    finally:
        params_path.write_text(original)
    dvc(repo, "repro", check=True)


def test_corrupted_weights_in_the_workspace_are_refused_at_package_with_the_bundle_untouched(repo):
    """What `dvc checkout` of a rotten cache object leaves behind: package re-hashes first."""
    weights = repo / "artifacts" / "quantized" / QUANTIZED / "model" / "model.gguf"
    original = weights.read_bytes()
    before = bundle_digests(repo)
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    weights.unlink()
    weights.write_bytes(bytes(flipped))
    try:
        result = dvc(repo, "repro", "-f", "-s", "package")
        assert result.returncode != 0
        assert "sha256 differs from its quantize record" in result.stdout + result.stderr
        assert bundle_digests(repo) == before
    finally:
        weights.unlink()
        weights.write_bytes(original)
    dvc(repo, "repro", check=True)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it where apt-get can)")
def test_the_offline_report_renders_in_a_headless_browser(repo, tmp_path):
    from PIL import Image

    result = quantbuild(repo, "report", "--out", str(tmp_path / "report.html"))
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "report.html").read_text()
    # self-contained: nothing to fetch (no script, no stylesheet or image from anywhere)
    assert "<script" not in page and "src=" not in page and "href=" not in page and "@import" not in page
    url = (tmp_path / "report.html").as_uri()
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    for chart in ("pareto", "families", "latency", "memory"):
        assert f'id="{chart}"' in dom
    whole = json.loads((repo / "artifacts" / "release" / "decision.json").read_text())
    decision = next(iter(whole["targets"].values()))
    assert dom.count('class="point"') >= 2 * len(decision["variants"]) and 'class="chosen"' in dom
    # It stands alone: nothing folded away, every check of every variant on the page with
    # its value and mark, one outcome per variant said the same way everywhere, a baseline
    # row, the headline numbers, the bundle, its commit and its signature's status.
    assert "<details" not in dom and "@media print" in dom
    from quantbuild.report_html import outcome

    for name, entry in decision["variants"].items():
        label = outcome(name, decision)
        assert f"{name} ({label})" in dom  # the size-vs-quality legend
        assert re.search(rf"<td>{name}</td><td[^>]*>{label}</td>", dom), (name, label)  # the headline table
        for check in entry["checks"]:
            assert f"<th>{check['budget']}<br>" in dom
            if not check["pass"]:
                assert "fails" in dom or "undecided" in dom
    assert '<tr class="baseline"><td>baseline</td>' in dom
    baseline = json.loads((repo / "artifacts" / "eval" / decision["target"] / "baseline" / "measurements.json")
                          .read_text())
    assert f"<td>{baseline['perplexity']:.4f}</td>" in dom
    manifest = json.loads((repo / BUNDLE / "manifest.json").read_text())
    assert f"{BUNDLE}/" in dom and manifest["git"]["commit"] in dom and "unsigned" in dom
    # printable: Chromium prints it to a PDF of more than one page
    pdf = tmp_path / "report.pdf"
    subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={profile}", f"--print-to-pdf={pdf}",
                    "--no-pdf-header-footer", url], capture_output=True, timeout=120, check=True)
    assert pdf.read_bytes().startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page[^s]", pdf.read_bytes())) >= 2
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                    "--window-size=1400,1400", "--hide-scrollbars", url], capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("L")
    pixels = list(image.getdata())
    drawn = sum(1 for value in pixels if value < 200) / len(pixels)
    # charts drew: axes, series, points and text cover a real share of the page
    assert drawn > 0.01, drawn
    # the chosen variant's colour appears (the first palette colour is some variant's series)
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 20


def test_a_failed_experiment_leaves_params_yaml_as_it_was(repo):
    before = (repo / "params.yaml").read_bytes()
    result = quantbuild(repo, "exp", "-S", "eval.limit=-3")
    assert result.returncode != 0
    assert "eval.limit=-3 is not allowed" in result.stderr + result.stdout
    assert "params.yaml is restored" in result.stderr
    assert (repo / "params.yaml").read_bytes() == before


def test_the_model_card_snippet_runs_from_the_repo_root_without_network(repo):
    card = (repo / BUNDLE / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "Path('" in snippet and ".resolve()" in snippet
    result = run(repo, sys.executable, "-c", snippet, env={"HF_HUB_OFFLINE": "1", "NO_PROXY": "*",
                                                           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() != ""
    # the card's example is a probe the released model answered right: it prints that answer
    claimed = re.search(r"# prints '([^']*)'", snippet)
    assert claimed is not None, snippet
    assert result.stdout.strip() == claimed.group(1), (result.stdout, claimed.group(1))
    assert "Validated in" in card and "llama.cpp" in card


def test_a_family_the_first_plan_fails_is_repaired_or_named_with_every_round_recorded(repo):
    """The closed loop: a planned variant (an auto-mix that starts mostly Q2_K) misses a
    family budget; the repair stage raises the layers most sensitive on that family, rebuilds
    and re-gates, round by round. A budget of 0 on four items cannot be met by any variant
    (the paired interval's upper end is above 0), so every round runs and the verdict names
    the family; the last build competes in the gate and nothing is released."""
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    mix = compose(REPO / "conf", ["quant=[gguf_mix_3p5]"])["quant"]["variants"]["gguf_mix_3p5"]
    # (the loop is what this checks: the plan's validation against the presets, which has
    # its own tests in test_gguf.py, is off)
    params["quant"]["variants"]["gguf_mix_2p9"] = {**mix, "target_bpw": 2.9, "mix_types": ["Q2_K", "Q4_K", "Q8_0"],
                                                   "validation_tokens": 0}
    params["gate"]["max_family_drop"] = {"reasoning": 0.0}
    params["gate"]["fallback"] = "none"
    params["repair"] = {"max_rounds": 3, "max_bits_per_weight": 3.6, "step_bits": 0.35}
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = dvc(repo, "repro")
        ran = stages_run(result.stdout)
        assert {"sensitivity", "quantize@gguf_mix_2p9", "evaluate@gguf_mix_2p9-llama.cpp-cpu", "repair", "select"} <= ran
        assert f"quantize@{QUANTIZED}" not in ran  # other variants' tables are stubs that did not change
        repair = json.loads((repo / "artifacts" / "repair" / "repair.json").read_text())
        outcome = repair["variants"]["gguf_mix_2p9"]
        assert outcome["failed_families"] == ["reasoning"]
        rounds = outcome["rounds"]
        # 2.9 -> 3.25 -> 3.6, then the ceiling: two rounds, each recorded.
        assert [r["target_bits_per_weight"] for r in rounds] == [3.25, 3.6]
        for previous, current in zip([None, *rounds], rounds):
            assert current["objective"] == ["reasoning"] and current["promoted"]
            assert current["bits_per_weight"] <= current["target_bits_per_weight"] + 1e-3
            if previous:
                assert current["bits_per_weight"] > previous["bits_per_weight"]
            assert any("reasoning_drop" in line for line in current["failed"])
            for step in current["promoted"]:
                assert step["to"] != step["from"] and "reasoning KL" in step["reason"]
        assert outcome["status"] == "unrepaired" and "could not repair reasoning" in outcome["verdict"]
        assert "separate model variant" in outcome["advice"]
        # Only the last round's build is kept, and it was gated like any variant.
        kept = sorted(p.name for p in (repo / "artifacts" / "repair" / "quantized").iterdir())
        assert kept == ["gguf_mix_2p9_r2"] == [outcome["final"]]
        decision = json.loads((repo / "artifacts" / "release" / "decision.json").read_text())
        assert decision["chosen"] is None and "gguf_mix_2p9_r2" in decision["variants"]
        assert decision["repair"]["variants"]["gguf_mix_2p9"]["rounds"] == rounds
        summary = quantbuild(repo, "summary")
        assert "could not repair reasoning" in summary.stdout and "separate model variant" in summary.stdout
        # The repair build is reported and compared like any variant.
        compare = quantbuild(repo, "compare", "baseline", "gguf_mix_2p9_r2")
        assert compare.returncode == 0 and "reasoning_drop" in compare.stdout, compare.stderr
        assert quantbuild(repo, "report", "--out", str(repo / "repair-report.html")).returncode == 0
    finally:
        params_path.write_text(original)
