"""Stage repair: the closed loop. Planned variants that fail a family's budget at the gate
are re-planned for that family, rebuilt and re-gated (src/quantbuild/repair.py).

    python -m stages.repair
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.determinism import make_deterministic
from quantbuild.repair import repair_ladder
from quantbuild.runtimes import ladder_runtime
from quantbuild.runtimes.protocol import LLAMA_CPP
from quantbuild.stage import progress, run_stage, say


def main(config: Config) -> None:
    make_deterministic(config.seed, torch=ladder_runtime(config) != LLAMA_CPP)
    result = repair_ladder(config, Path(config.paths.repair), log=progress)
    lines = [f"{name}: {outcome['verdict']}" for name, outcome in sorted(result["variants"].items())]
    say("repair: " + ("; ".join(lines) if lines else "no planned variant"))


if __name__ == "__main__":
    run_stage(main)
