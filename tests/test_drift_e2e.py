"""Environment drift end to end: a library upgrade reruns exactly the stages whose scope it
touches, on a copy of the session's built project (its own file: the drifted build is not
the other tests' to undo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import BIN, BUNDLE, QUANTIZED, copy_project, dvc, run, stages_run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

@pytest.fixture(scope="module")
def repo(built_project, tmp_path_factory) -> Path:
    return copy_project(built_project, tmp_path_factory.mktemp("drift") / "repo")


def _fake_version(tmp_path: Path, name: str, dist: str) -> dict:
    folder = tmp_path / f"fake-{name}" / f"{dist}-9.9.9.dist-info"
    folder.mkdir(parents=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9.9\n")
    return {"PYTHONPATH": str(folder.parent)}


def test_torch_library_drift_reruns_no_gguf_stage(repo, tmp_path):
    env = _fake_version(tmp_path, "bitsandbytes", "bitsandbytes")
    assert run(repo, str(BIN / "quantbuild"), "verify", BUNDLE, env=env).returncode == 0
    ran = stages_run(dvc(repo, "repro", env=env, check=True).stdout)
    assert ran == {"fingerprint"}


def test_llama_cpp_drift_reruns_exactly_the_llama_cpp_stages(repo, tmp_path):
    env = _fake_version(tmp_path, "llama-cpp-python", "llama_cpp_python")
    verify = run(repo, str(BIN / "quantbuild"), "verify", BUNDLE, env=env)
    assert verify.returncode == 2
    assert "llama_cpp.llama_cpp_python" in verify.stderr and "dvc repro" in verify.stderr
    assert run(repo, str(BIN / "quantbuild"), "verify", f"{BUNDLE}/model.gguf", env=env).returncode == 2
    dvc(repo, "repro", "-s", "fingerprint", env=env, check=True)
    status = dvc(repo, "status", env=env).stdout
    assert f"quantize@{QUANTIZED}" in status and f"evaluate@{QUANTIZED}-llama.cpp-cpu" in status
    assert "fetch:" not in status and "calibrate:" not in status
    ran = stages_run(dvc(repo, "repro", env=env, check=True).stdout)
    llama_stages = {"gguf_base", "imatrix", "evaluate_baseline@llama.cpp-cpu", "quantize@gguf_q8_0", f"quantize@{QUANTIZED}",
                    "evaluate@gguf_q8_0-llama.cpp-cpu", f"evaluate@{QUANTIZED}-llama.cpp-cpu"}
    assert llama_stages <= ran
    assert not ran & {"fetch", "calibrate"}
    assert run(repo, str(BIN / "quantbuild"), "verify", BUNDLE, env=env).returncode == 0
