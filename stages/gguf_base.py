"""Stage gguf_base: the baseline converted to GGUF by llama.cpp's converter (only a record
when no variant is gguf).

    python -m stages.gguf_base
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.gguf_base import build_base
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    needed = any(variant.method == "gguf" for variant in config.quant.variants.values())
    record = build_base(Path(config.paths.baseline), config.gguf.base_type, needed, Path(config.paths.gguf_base))
    if not record["converted"]:
        say(f"gguf_base: skipped ({record['reason']})")
        return
    say(f"gguf_base: {config.gguf.base_type.upper()} GGUF, pre-tokenizer {record['pre_tokenizer']}")


if __name__ == "__main__":
    run_stage(main)
