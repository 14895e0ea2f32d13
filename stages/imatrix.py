"""Stage imatrix: llama-imatrix's importance matrix of the seeded calibration mix over the
baseline GGUF (only a record when no gguf variant uses one).

    python -m stages.imatrix
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.fingerprint import cpu_info
from quantbuild.gguf_base import build_imatrix
from quantbuild.runtimes.llama_build import repack_allowed
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    paths = config.paths
    needed = any(variant.method == "gguf" and variant.imatrix for variant in config.quant.variants.values())
    record = build_imatrix(Path(paths.gguf_base), Path(paths.baseline), config.calibration,
                           Path(paths.calibration_data), needed, repack_allowed(cpu_info()["isa"]), Path(paths.imatrix))
    matrix = record["imatrix"]
    say(f"imatrix: over {matrix['tokens_used']} tokens ({matrix['chunks']} chunks of {matrix['chunk_size']})"
        if matrix else "imatrix: skipped (no gguf variant uses an importance matrix)")


if __name__ == "__main__":
    run_stage(main)
