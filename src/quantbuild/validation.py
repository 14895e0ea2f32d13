"""The whole of a configuration's validation: the schema and its value ranges (`config`),
then the rules that need the method registry and the deploy targets.

`config` is the schema and knows no method or runtime; the registry and the targets know
no schema. This module sits above both, so neither has to import the other, and every
caller that loads `params.yaml` (the stages, the CLI, the benches) gets all of the rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantbuild.config import Config, parse, read_params
from quantbuild.errors import ConfigError
from quantbuild.quantizers import check_variant
from quantbuild.runtimes import RUN_TARGETS, TARGET_RUNTIME, check_target, target_of


def check_ladder(config: Config) -> None:
    """Every variant's method rules and target, and one deploy runtime for the ladder."""
    for name, variant in config.quant.variants.items():
        check_variant(f"quant.variants.{name}", variant)
        check_target(f"quant.variants.{name}", variant)
    runtimes = {name: TARGET_RUNTIME[target_of(variant.method, variant.target)]
                for name, variant in config.quant.variants.items()}
    if len(set(runtimes.values())) > 1:
        first = next(iter(runtimes))
        other = next(name for name, runtime in runtimes.items() if runtime != runtimes[first])
        raise ConfigError(f"params.yaml: quant.variants: {first} deploys on {runtimes[first]} but {other} on "
                          f"{runtimes[other]} (allowed: one runtime per ladder, measured against its own baseline; "
                          f"run the other ladder as its own experiment)")
    runtime = next(iter(runtimes.values()))
    if runtime != "llama.cpp" and len(config.eval.targets) > 1:
        raise ConfigError(f"params.yaml: eval.targets={config.eval.targets}: a {runtime} ladder is validated on one "
                          f"target (allowed: torch-cpu | torch-cuda)")
    measurable = {family for family, _ in RUN_TARGETS.values()}
    for target in config.eval.targets:
        # (a runtime quantbuild does not measure on, vLLM, is refused where it would run)
        if runtime in measurable and RUN_TARGETS[target][0] != runtime:
            allowed = " | ".join(name for name, (family, _) in RUN_TARGETS.items() if family == runtime)
            raise ConfigError(f"params.yaml: eval.targets: {target} does not run this ladder, which deploys on "
                              f"{runtime} (allowed: {allowed})")


def validate_raw(raw: Any) -> Config:
    """A composed config (a plain dict), validated whole; a problem is one ConfigError line."""
    config = parse(raw)
    check_ladder(config)
    return config


def load_config(params_path: Path = Path("params.yaml")) -> Config:
    """Load and validate the whole of `params.yaml`; a problem is one ConfigError line."""
    return validate_raw(read_params(params_path))
