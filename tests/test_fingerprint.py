"""Fingerprints: stable, free of host identity, and sensitive to library drift."""

import json
import socket
import subprocess
import sys

from conftest import REPO
from quantbuild.fingerprint import drift, fingerprints


def test_stable_and_anonymous():
    first, second = fingerprints(), fingerprints()
    assert first == second
    text = json.dumps(first)
    assert socket.gethostname() not in text
    assert set(first) == {"build", "runtime", "llama_cpp"}
    assert first["build"]["packages"]["gptqmodel"] != "absent"
    llama = first["llama_cpp"]["llama_cpp"]
    assert llama["installed"] and llama["llama_cpp_python"] == "0.3.36" and llama["llama_cpp_commit"] != "unknown"
    assert "CPU" in llama["backend"] and isinstance(llama["repack"], bool)


def test_each_method_depends_on_its_own_scope():
    from quantbuild.fingerprint import method_files

    prints = fingerprints()
    files = method_files(prints, ["gguf", "gptq"])
    assert files["gguf.build.json"] == files["gguf.runtime.json"] == prints["llama_cpp"]
    assert files["gptq.build.json"] == prints["build"] and files["gptq.runtime.json"] == prints["runtime"]


def test_fake_dist_info_on_pythonpath_is_seen_as_drift(tmp_path):
    dist = tmp_path / "bitsandbytes-9.9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 9.9.9\n")
    code = "import json; from quantbuild.fingerprint import fingerprints; print(json.dumps(fingerprints()))"
    drifted = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                        env={"PYTHONPATH": f"{tmp_path}:{REPO / 'src'}"}).stdout)
    changes = drift(fingerprints()["runtime"], drifted["runtime"])
    assert [(key, new) for key, _, new in changes] == [("packages.bitsandbytes", "9.9.9")]


def test_the_torch_runtime_device_and_kernels_are_part_of_the_runtime_scope():
    """A variant measured through another kernel or dtype gives other numbers: the torch
    runtime's settings are runtime-scope drift, named key by key; the build scope is untouched."""
    from quantbuild.config import EvalConfig
    from quantbuild.runtimes import torch_runtime

    cpu = torch_runtime(EvalConfig(), "cpu")
    assert cpu == {"device": "cpu", "quality": "dequantized", "latency": "kernel",
                   "kernels": {"gptqmodel": "torch (GPTQModel's CPU choice)", "bitsandbytes": "cpu",
                               "dense": "torch float32"}}
    plain, with_torch = fingerprints(), fingerprints(cpu)
    assert with_torch["runtime"]["torch_runtime"] == cpu and "torch_runtime" not in plain["runtime"]
    assert with_torch["build"] == plain["build"] and with_torch["llama_cpp"] == plain["llama_cpp"]
    kernel = fingerprints(torch_runtime(EvalConfig(runtime="kernel"), "cpu"))
    assert drift(with_torch["runtime"], kernel["runtime"]) == [("torch_runtime.quality", "dequantized", "kernel")]
