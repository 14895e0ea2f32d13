"""Deploy targets and the runtimes that measure them.

Each variant names the runtime family it ships for (`target`; by default its method's):
llama.cpp for GGUF, GPTQModel's loader and kernels for GPTQ/AWQ/RTN/mixed checkpoints,
bitsandbytes (through transformers) for bnb, or vLLM for the GPTQ/AWQ formats its kernels
take. It is measured on that family's runtime (`TARGET_RUNTIME`): llama.cpp, or the torch
stack. A ladder deploys on one runtime, and its baseline is measured on that runtime in the
same pipeline run (for llama.cpp: the baseline's own F16 GGUF), so a variant is never judged
against numbers from another runtime.

A run validates its ladder for one or more *deploy targets* (`eval.targets`): that runtime
on a kind of device, `llama.cpp-cpu`, `llama.cpp-cuda`, `torch-cpu` or `torch-cuda`
(`RUN_TARGETS`). Every variant and the baseline are measured on each of them, and the gate
decides per target: the same file can be a win on one and a loss on another. A format the
runtime cannot load is refused at config time; a target this machine cannot run, before any
work.
"""

from __future__ import annotations

from typing import Any, Optional

from quantbuild.config import EVAL_TARGETS
from quantbuild.errors import ConfigError, RuntimeUnavailable
from quantbuild.runtimes.protocol import LLAMA_CPP, TORCH

VLLM = "vllm"
# target -> the runtime it is measured on
TARGET_RUNTIME = {LLAMA_CPP: LLAMA_CPP, "gptqmodel": TORCH, "bitsandbytes": TORCH, "transformers": TORCH, VLLM: VLLM}
# method -> the targets that load its format (the first is the default)
METHOD_TARGETS = {"gguf": (LLAMA_CPP,), "gptq": ("gptqmodel", VLLM), "awq": ("gptqmodel", VLLM),
                  "rtn": ("gptqmodel",), "mixed": ("gptqmodel",), "bnb": ("bitsandbytes",),
                  "dense": ("transformers",)}
# deploy target -> (runtime, device): the schema's names, `<runtime>-<device>`
RUN_TARGETS = {name: tuple(name.rsplit("-", 1)) for name in EVAL_TARGETS}
# vLLM's GPTQ/AWQ kernels (Marlin, GPTQ, AWQ) take these bit widths only.
VLLM_BITS = (4, 8)


def target_of(method: str, target: Optional[str] = None) -> str:
    """The target a variant ships for (its config's or its quantize record's `target`), or
    its method's default."""
    return target or METHOD_TARGETS.get(method, ("gptqmodel",))[0]


def ladder_runtime(config: Any) -> str:
    """The one runtime every variant of the ladder deploys on (`validation` checks there is one)."""
    first = next(iter(config.quant.variants.values()))
    return TARGET_RUNTIME[target_of(first.method, first.target)]


def target_device(target: str) -> str:
    """The device a deploy target (`llama.cpp-cuda`) runs on (`cuda`)."""
    return RUN_TARGETS[target][1]


def require_run_target(target: str) -> None:
    """Fail in one line, before any work, when this machine cannot run deploy target `target`."""
    runtime, device = RUN_TARGETS[target]
    if runtime == LLAMA_CPP:
        from quantbuild.runtimes.llama_cpp import require_available, require_device

        require_available()
        require_device(device)
    elif device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailable(f"target {target}: not available here (torch sees no CUDA GPU; validate for "
                                     f"torch-cpu, or run on a machine with one)")


def check_target(key: str, variant: Any) -> None:
    """Refuse, in one line, a target that cannot load the variant's format."""
    target = target_of(variant.method, variant.target)
    allowed = METHOD_TARGETS.get(variant.method, ())
    if target not in allowed:
        raise ConfigError(f"params.yaml: {key}.target={target!r} cannot load the {variant.method} format "
                          f"(allowed for {variant.method}: {' | '.join(allowed)})")
    if target == VLLM and getattr(variant, "bits", None) not in VLLM_BITS:
        raise ConfigError(f"params.yaml: {key}.target='vllm' cannot load it: vLLM's {variant.method.upper()} kernels "
                          f"take bits {' or '.join(map(str, VLLM_BITS))}, this variant has bits={variant.bits} "
                          f"(allowed: bits 4 or 8, or target gptqmodel)")


def require_target(target: str) -> None:
    """Fail in one line, before any work, when this machine cannot run `target`."""
    runtime = TARGET_RUNTIME.get(target, target)
    if runtime == LLAMA_CPP:
        from quantbuild.runtimes.llama_cpp import require_available

        require_available()
    elif runtime == TORCH:
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise RuntimeUnavailable(f"target {target}: not available here ({err}; run `make install`)") from None
    elif runtime == VLLM:
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailable("target vllm: not available here (it needs a CUDA GPU; this machine has none)")
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeUnavailable("target vllm: not available here (the vllm package is not installed)")
        raise RuntimeUnavailable("target vllm: quantbuild does not measure on vLLM yet; ship this variant for "
                                 "target gptqmodel, which it is validated on")
    else:
        raise RuntimeUnavailable(f"target {target!r}: unknown (known: {', '.join(TARGET_RUNTIME)})")


def torch_runtime(eval_config: Any, device: str) -> dict[str, Any]:
    """How the torch runtime loads and runs artifacts on `device`: dtype and each format's
    kernel.

    It belongs to the runtime fingerprint: the same weights measured through another kernel
    or dtype give other numbers, so a change here re-runs evaluation like a library upgrade.
    """
    if device == "cuda":
        kernels = {"gptqmodel": dict(sorted(eval_config.gpu_kernels.items())), "bitsandbytes": "cuda",
                   "dense": "torch float16 (kernel), float32 (dequantized)"}
    else:
        kernels = {"gptqmodel": "torch (GPTQModel's CPU choice)", "bitsandbytes": "cpu", "dense": "torch float32"}
    return {"device": device, "quality": eval_config.runtime, "latency": eval_config.latency.runtime,
            "kernels": kernels}
