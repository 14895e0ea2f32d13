"""Build and runtime fingerprints: the environment that can change numbers, and nothing else.

No hostname, no timestamp, no paths: the same machine and libraries give the same bytes, so
DVC reruns a stage only when something that matters drifted. Versions come from package
metadata (no heavy imports); the device from /proc/cpuinfo and nvidia-smi where present.

Scopes: *build* is what changes quantized weights (`quantize` depends on it); *runtime* is
what changes measured results (`evaluate` depends on it, and `verify` compares it). Both
describe the torch stack. *llama_cpp* is both scopes for GGUF variants: the pinned
llama-cpp-python, the llama.cpp commit it vendors, its gguf-py, its build (cpu or cuda
backend; for cuda the CUDA version and GPU architectures), the weight-repack choice and the
device. Each method's stages depend on their own scope's file (`methods/`), so a llama.cpp
upgrade reruns exactly the gguf stages and a torch upgrade exactly the others.
`target_fingerprint` is one llama.cpp deploy target's: that build and the device it runs on.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

BUILD_PACKAGES = ("torch", "transformers", "gptqmodel", "bitsandbytes", "safetensors", "numpy")
RUNTIME_PACKAGES = BUILD_PACKAGES + ("tokenizers", "jsonschema")
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
# What the stages set before touching torch (see quantbuild.determinism); recorded so a
# change of policy is itself drift.
DETERMINISM = {"deterministic_algorithms": True, "cublas_workspace_config": ":4096:8", "seeded": True}


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def cpu_info() -> dict[str, object]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = sorted(flag for flag in flags if flag in ISA_FLAGS or flag.startswith("avx512"))
    return {"arch": platform.machine(), "model": model, "isa": isa, "cores": os.cpu_count() or 0}


def gpu_info() -> list[dict[str, str]]:
    """Each visible NVIDIA GPU's name, compute capability and driver ([] without one)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in output.strip().splitlines():
        name, capability, driver = (part.strip() for part in line.split(","))
        gpus.append({"name": name, "compute_capability": capability, "driver": driver})
    return gpus


def fingerprints(torch_runtime: dict | None = None) -> dict[str, dict]:
    """{"build": ..., "runtime": ..., "llama_cpp": ...}; JSON-able dicts, stable across runs.

    `torch_runtime` (`runtimes.torch_runtime`: device, dtype, kernel per format) joins the
    runtime scope where given: the pipeline's fingerprint stage gives it, and `verify` gives
    the one a bundle was validated with, so only the machine and libraries are compared."""
    from quantbuild.runtimes import llama_cpp

    cpu = cpu_info()
    device = {"cpu": cpu, "gpu": gpu_info()}
    python = platform.python_version()
    runtime = {"python": python, "packages": package_versions(RUNTIME_PACKAGES), "device": device,
               "determinism": DETERMINISM}
    if torch_runtime is not None:
        runtime["torch_runtime"] = torch_runtime
    return {
        "build": {"python": python, "packages": package_versions(BUILD_PACKAGES), "device": device,
                  "determinism": DETERMINISM},
        "runtime": runtime,
        LLAMA_CPP_SCOPE: {"python": python, "llama_cpp": llama_cpp.fingerprint(cpu["isa"]), "device": device},
    }


LLAMA_CPP_SCOPE = "llama_cpp"


def target_fingerprint(device: str) -> dict[str, object]:
    """What can change a llama.cpp target's measured numbers besides the model, on `device`
    (cpu | cuda): the llama.cpp fingerprint (its `build` names the backend and, for CUDA,
    the CUDA version and GPU architectures it was compiled for) and the CPU, and on CUDA
    also the GPUs (name, compute capability, driver). Stable across runs (no timestamps, no
    free memory) and cheap."""
    from quantbuild.runtimes import llama_cpp

    llama_cpp.check_device(device)
    cpu = cpu_info()
    values: dict[str, object] = {"llama_cpp": llama_cpp.fingerprint(cpu["isa"]), "cpu": cpu}
    if device == "cuda":
        values["gpu"] = gpu_info()
    return values


def scopes_of(method: str) -> tuple[str, str]:
    """(build scope, runtime scope) of a quantization method's stages."""
    return (LLAMA_CPP_SCOPE, LLAMA_CPP_SCOPE) if method == "gguf" else ("build", "runtime")


def method_files(prints: dict[str, dict], methods: list[str]) -> dict[str, dict]:
    """`methods/<method>.<build|runtime>.json` contents: each method's own scopes."""
    files = {}
    for method in methods:
        build, runtime = scopes_of(method)
        files[f"{method}.build.json"] = prints[build]
        files[f"{method}.runtime.json"] = prints[runtime]
    return files


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Dotted keys -> leaf values, for naming exactly which key drifted."""
    if isinstance(value, dict):
        flat: dict[str, object] = {}
        for key in sorted(value):
            flat.update(flatten(value[key], f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def drift(recorded: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for every key whose value differs between two fingerprints."""
    old, new = flatten(recorded), flatten(current)
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def libraries_of(method: str) -> dict[str, str]:
    """The library versions a method's artifacts are built with (for records and manifests)."""
    if method == "gguf":
        from quantbuild.runtimes.llama_build import vendored_commit

        return {**package_versions(("llama-cpp-python", "gguf")), "llama.cpp": vendored_commit()}
    return package_versions(BUILD_PACKAGES)
