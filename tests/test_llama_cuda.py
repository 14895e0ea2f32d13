"""llama.cpp on a device: the CPU target exactly as before (no GPU used, even by a CUDA
build), the CUDA target with every layer offloaded, memory as llama.cpp reports its buffers
per device, the build's backend in the fingerprint, and one line where a target cannot run.

The gpu-marked tests need a CUDA build of llama.cpp (`make install` on a machine with nvcc
and an NVIDIA GPU) and are skipped without one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BASELINE, REPO
from quantbuild.errors import ConfigError, RuntimeUnavailable
from quantbuild.runtimes import llama_build, llama_cpp
from quantbuild.runtimes.protocol import LLAMA_CPP, LoadSpec
from quantbuild.tasks.items import load_items

# The log of a fully offloaded 8-layer model on one GPU, in llama.cpp's own formats
# (llama-model.cpp "%s: %12s model buffer size = %8.2f MiB", llama-context.cpp and
# llama-kv-cache.cpp "%s: %10s ... buffer size = %8.2f MiB"): the input embeddings stay on
# the CPU (CPU_Mapped), staging buffers are pinned host memory (CUDA_Host).
CUDA_LOG = [
    "load_tensors: offloading output layer to GPU\n",
    "load_tensors: offloading 8 repeating layers to GPU\n",
    "load_tensors: offloaded 9/9 layers to GPU\n",
    "load_tensors: %12s model buffer size = %8.2f MiB\n" % ("CUDA0", 14.52),
    "load_tensors: %12s model buffer size = %8.2f MiB\n" % ("CPU_Mapped", 0.50),
    "llama_context: %10s  output buffer size = %8.2f MiB\n" % ("CUDA_Host", 0.02),
    "llama_kv_cache: %10s KV buffer size = %8.2f MiB\n" % ("CUDA0", 2.00),
    "sched_reserve: %10s compute buffer size = %8.2f MiB\n" % ("CUDA0", 4.50),
    "sched_reserve: %10s compute buffer size = %8.2f MiB\n" % ("CUDA_Host", 0.52),
]
MEMORY_KEYS = {"peak_mb", "kv_cache_mb", "weights_mb", "compute_mb", "output_mb"}


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    """The bundled baseline as F16 GGUF, converted in a process of its own: the converter
    runs torch, which this file's process (llama.cpp on a GPU) must never load."""
    path = tmp_path_factory.mktemp("llama_cuda") / "base.gguf"
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from quantbuild.runtimes.gguf_file import convert; "
                    "convert(Path(sys.argv[1]), Path(sys.argv[2]), 'f16')", str(BASELINE), str(path)], check=True,
                   capture_output=True)
    return path


def test_reading_a_gguf_header_loads_llama_cpp_before_gguf_py(gguf):
    """gguf-py imports sentencepiece, whose wheel carries a second GNU OpenMP runtime; a CUDA
    build of llama.cpp loaded after it crashed in model loading (SIGSEGV on the H200). A
    fresh process that reads a header (as evaluate and verify do before they load the file)
    has llama.cpp's libraries in first, and then runs the model."""
    code = ("import sys; from pathlib import Path; from quantbuild.runtimes import gguf_file, llama_cpp; "
            "gguf_file.layout(Path(sys.argv[1])); order = list(sys.modules); "
            "assert 'llama_cpp' in order and order.index('llama_cpp') < order.index('gguf'), order; "
            "model = llama_cpp.LlamaCppModel(Path(sys.argv[1]), n_ctx=64, threads=1); "
            "print(model.logprobs(model.tokenize('Hello'))[-1].argmax())")
    result = subprocess.run([sys.executable, "-c", code, str(gguf)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().isdigit(), result.stderr[-2000:]


def test_a_cuda_log_splits_into_the_gpu_s_buffers_and_the_host_s():
    buffers = llama_cpp.logged_buffers(CUDA_LOG, "cuda")
    assert buffers.device == {"weights": 14.52, "kv_cache": 2.0, "compute": 4.5}
    assert buffers.host == {"weights": 0.5, "output": 0.02, "compute": 0.52}
    assert buffers.types == {"CUDA0": {"weights": 14.52, "kv_cache": 2.0, "compute": 4.5},
                             "CPU_Mapped": {"weights": 0.5}, "CUDA_Host": {"output": 0.02, "compute": 0.52}}
    # on the CPU every buffer is the device's, summed by kind as before
    on_cpu = llama_cpp.logged_buffers(CUDA_LOG, "cpu")
    assert on_cpu.device == {"weights": 15.02, "output": 0.02, "kv_cache": 2.0, "compute": 5.02} and on_cpu.host == {}


def test_an_unknown_device_is_one_line(gguf):
    with pytest.raises(ConfigError, match=r"^llama.cpp: device 'metal' is not allowed \(allowed: cpu \| cuda\)$"):
        llama_cpp.open(LoadSpec(LLAMA_CPP, gguf, threads=2, device="metal"))


def test_cuda_is_refused_in_one_line_where_llama_cpp_cannot_run_it(gguf, monkeypatch):
    if "cuda" in llama_cpp.devices():
        pytest.skip("llama.cpp runs on CUDA here")
    assert llama_cpp.devices() == ["cpu"]
    if llama_build.build_backend() == "cpu":
        with pytest.raises(RuntimeUnavailable) as refused:
            llama_cpp.open(LoadSpec(LLAMA_CPP, gguf, threads=2, device="cuda"))
        assert str(refused.value) == (
            "target llama.cpp-cuda: not available here (llama.cpp was built for the CPU only; `make install` builds "
            "the CUDA backend where nvcc and an NVIDIA GPU are present)")
    # a CUDA build on a machine whose GPU it cannot see
    monkeypatch.setattr(llama_cpp, "build_backend", lambda: "cuda")
    with pytest.raises(RuntimeUnavailable, match=r"^target llama.cpp-cuda: not available here \(no NVIDIA GPU is "
                                                 r"visible\)$"):
        llama_cpp.require_device("cuda")


def test_the_cpu_target_records_its_device_flash_attention_and_memory(gguf):
    with llama_cpp.open(LoadSpec(LLAMA_CPP, gguf, threads=2, n_ctx=256)) as model:
        described = model.describe()["llama_cpp"]
        assert described["device"] == "cpu" and described["backend"] == llama_build.build_backend()
        # "auto" resolved by llama.cpp: the CPU backend has flash attention
        assert described["flash_attention"] == "enabled"
        assert model.probe_settings() == {"kv_cache_type": "f16", "repack": False, "device": "cpu",
                                          "flash_attention": "enabled"}
        # every buffer is host memory on the CPU, none a GPU's
        assert model.buffers.host == {} and not any(name.startswith("CUDA") for name in model.buffers.types)
        memory = model.memory([256, 512], 64.0)
        with model.at_threads(1) as single:
            assert single.device == "cpu"
    assert memory["device"] == "cpu" and memory["runtime"] == LLAMA_CPP
    for length, entry in memory["by_context"].items():
        assert set(entry) == MEMORY_KEYS
        buffers = llama_cpp.memory_at(gguf, int(length), "f16", 2, False)
        assert entry["peak_mb"] == round(sum(buffers.values()), 3) and entry["weights_mb"] == buffers["weights"] > 0
    assert memory["kv_cache_bytes_per_token"] == 8192  # 8 layers x 2 x 256 dims x 2 bytes (f16)


def test_a_quantized_kv_cache_runs_with_flash_attention_on_the_cpu(gguf):
    with llama_cpp.open(LoadSpec(LLAMA_CPP, gguf, threads=2, n_ctx=256, kv_type="q8_0")) as model:
        assert model.describe()["llama_cpp"]["flash_attention"] == "enabled"


def test_build_info_reads_what_make_install_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_build, "bin_dir", lambda: tmp_path)
    assert llama_build.build_info() == {"backend": "cpu"}
    (tmp_path / "libggml-cuda.so").write_bytes(b"")
    assert llama_build.build_info() == {"backend": "cuda", "cuda_version": "unknown", "cuda_architectures": "unknown"}
    # the Makefile's record
    (tmp_path / llama_build.BUILD_INFO).write_text(
        '{"backend": "cuda", "cuda_version": "13.0.88", "cuda_architectures": "80;90"}\n')
    assert llama_build.build_info() == {"backend": "cuda", "cuda_version": "13.0.88", "cuda_architectures": "80;90"}


def test_a_target_s_fingerprint_names_the_build_and_its_device():
    from quantbuild.fingerprint import cpu_info, fingerprints, target_fingerprint

    cpu = target_fingerprint("cpu")
    assert set(cpu) == {"llama_cpp", "cpu"} and cpu["cpu"] == cpu_info()
    assert cpu["llama_cpp"]["build"]["backend"] == llama_build.build_backend()
    assert target_fingerprint("cpu") == cpu  # stable: nothing in it changes between calls
    assert set(target_fingerprint("cuda")) == {"llama_cpp", "cpu", "gpu"}
    assert fingerprints()["llama_cpp"]["llama_cpp"]["build"] == llama_build.build_info()
    with pytest.raises(ConfigError, match="device 'rocm' is not allowed"):
        target_fingerprint("rocm")


# --- on a GPU -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda(gguf) -> Path:
    """The GGUF, where this machine's llama.cpp runs on CUDA."""
    if "cuda" not in llama_cpp.devices():
        pytest.skip("llama.cpp was not built with CUDA here, or sees no GPU")
    return gguf


@pytest.mark.gpu
@pytest.mark.slow
def test_the_cuda_target_offloads_every_layer_and_reports_the_gpu_s_memory(cuda):
    with llama_cpp.open(LoadSpec(LLAMA_CPP, cuda, threads=2, n_ctx=256, device="cuda")) as model:
        described = model.describe()["llama_cpp"]
        assert described["device"] == "cuda" and described["backend"] == "cuda"
        assert described["flash_attention"] == "enabled"
        assert model.buffers.types["CUDA0"]["weights"] > 0 and model.buffers.device["kv_cache"] > 0
        memory = model.memory([256], 4096.0)
    entry = memory["by_context"]["256"]
    assert memory["device"] == "cuda" and set(entry) == MEMORY_KEYS | {"host_mb", "buffers_mb"}
    # the repeating layers and the output layer on the GPU; only the input embeddings (and
    # staging) in host memory
    assert entry["weights_mb"] == entry["buffers_mb"]["CUDA0"]["weights"] > entry["host_mb"] > 0
    assert entry["kv_cache_mb"] == entry["buffers_mb"]["CUDA0"]["kv_cache"] > 0


@pytest.mark.gpu
@pytest.mark.slow
def test_the_cpu_target_of_a_cuda_build_uses_no_gpu(cuda):
    with llama_cpp.open(LoadSpec(LLAMA_CPP, cuda, threads=2, n_ctx=256)) as model:
        assert not any(name.startswith("CUDA") for name in model.buffers.types), model.buffers.types


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_greedy_completions_agree_with_the_cpu_target_s(cuda):
    items = [item for family in ("reasoning", "structured", "retrieval", "language_modelling")
             for item in load_items(REPO / "data" / "eval" / f"{family}.jsonl")[:4]]
    prompts = [item.prompt for item in items]
    completions = {}
    for device in ("cpu", "cuda"):
        with llama_cpp.open(LoadSpec(LLAMA_CPP, cuda, threads=2, n_ctx=2048, batch_size=4, device=device)) as model:
            completions[device] = [completion.text for completion in model.complete(prompts, 24)]
    same = sum(cpu == gpu for cpu, gpu in zip(completions["cpu"], completions["cuda"]))
    print(f"llama.cpp CUDA vs CPU: {same}/{len(prompts)} greedy completions identical")
    assert same > len(prompts) // 2
