"""Stage fingerprint: write the build, runtime and llama.cpp fingerprints, each method's
scopes under methods/, and each deploy target's under targets/ (always runs; cheap).

    python -m stages.fingerprint
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.fingerprint import fingerprints, method_files, scopes_of, target_fingerprint
from quantbuild.hashing import write_json
from quantbuild.quantizers import method_names
from quantbuild.runtimes import (TORCH, ladder_runtime, require_run_target, require_target,
                                 target_device, target_of, torch_runtime)
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    # Every variant's runtime and every deploy target must run here: said in one line before
    # any work.
    for target in sorted({target_of(variant.method, variant.target) for variant in config.quant.variants.values()}):
        require_target(target)
    targets = config.eval.targets
    for target in targets:
        require_run_target(target)
    out = Path(config.paths.fingerprint)
    # A torch ladder's device and kernels (its one target, eval.gpu_kernels) are part of its
    # runtime scope: a variant measured through another kernel is measured again.
    torch = ladder_runtime(config) == TORCH
    prints = fingerprints(torch_runtime(config.eval, target_device(targets[0])) if torch else None)
    for scope, values in prints.items():
        write_json(out / f"{scope}.json", values)
    for name, values in method_files(prints, method_names()).items():
        write_json(out / "methods" / name, values)
    # The baseline is measured, and the bundle packaged, on the ladder's runtime: those stages
    # depend on its scopes only.
    build, runtime = scopes_of(next(iter(config.quant.variants.values())).method)
    write_json(out / "methods" / "ladder.build.json", prints[build])
    write_json(out / "methods" / "ladder.runtime.json", prints[runtime])
    # Each target's evaluations depend on its own file: the ladder's runtime scope and that
    # device (a GPU driver change re-measures the CUDA target only).
    for target in targets:
        write_json(out / "targets" / f"{target}.json",
                   {"target": target, "runtime": prints[runtime],
                    "device": {} if torch else target_fingerprint(target_device(target))})
    say(f"fingerprint: {len(prints)} scopes, targets {', '.join(targets)}")


if __name__ == "__main__":
    run_stage(main)
