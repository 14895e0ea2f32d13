"""Stage gguf_base: the baseline converted to GGUF by llama.cpp's converter, and the
importance matrix of the calibration mix (only a record when no variant is gguf).

    python -m stages.gguf_base
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.fingerprint import cpu_info
from quantbuild.gguf_base import build_base
from quantbuild.runtimes.llama_build import repack_allowed
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    gguf = [variant for variant in config.quant.variants.values() if variant.method == "gguf"]
    paths = config.paths
    record = build_base(Path(paths.baseline), config.calibration, Path(paths.calibration_data), config.gguf.base_type,
                        needed=bool(gguf), imatrix=any(variant.imatrix for variant in gguf),
                        repack=repack_allowed(cpu_info()["isa"]), out=Path(paths.gguf_base))
    if not record["converted"]:
        say(f"gguf_base: skipped ({record['reason']})")
        return
    imatrix = record["imatrix"]
    matrix = f", imatrix over {imatrix['tokens_used']} tokens ({imatrix['chunks']} chunks)" if imatrix else ""
    say(f"gguf_base: {config.gguf.base_type.upper()} GGUF, pre-tokenizer {record['pre_tokenizer']}{matrix}")


if __name__ == "__main__":
    run_stage(main)
