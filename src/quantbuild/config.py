"""Configuration schema (Hydra structured configs) and validation of `params.yaml`.

`conf/` is composed by Hydra against these dataclasses; `params.yaml` is that composition,
committed, and every stage re-validates its own section with `load_section` before any
work. Type errors, unknown keys and out-of-range values become one-line `ConfigError`s
naming the key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from quantbuild.errors import ConfigError

SCHEMA_NAME = "quantbuild_schema"


@dataclass
class PathsConfig:
    artifacts: str = "artifacts"
    fingerprint: str = "artifacts/fingerprint"
    baseline: str = "artifacts/baseline"
    calibration: str = "artifacts/calibration"
    quantized: str = "artifacts/quantized"
    eval: str = "artifacts/eval"
    release: str = "artifacts/release"
    package: str = "artifacts/package"
    eval_data: str = "data/eval"
    calibration_data: str = "data/calibration"


@dataclass
class ModelConfig:
    name: str = "???"
    source: str = "path"
    path: Optional[str] = None
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    files: Dict[str, str] = field(default_factory=dict)
    allow_pickle: bool = False


@dataclass
class SensitivityConfig:
    """Per-layer sensitivity: KL divergence of the output when only that layer is
    round-to-nearest quantized at `bits`/`group_size`, over `samples` calibration samples
    (0 = not measured)."""

    samples: int = 4
    bits: int = 3
    group_size: int = 64


@dataclass
class CalibrationConfig:
    sources: Dict[str, float] = field(default_factory=dict)
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)


@dataclass
class OverrideConfig:
    """Layers whose full name matches `pattern` (a regular expression, whole name) get
    `bits`/`group_size` instead of the variant's."""

    pattern: str = "???"
    bits: int = 8
    group_size: int = 128


@dataclass
class VariantConfig:
    method: str = "???"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.05
    # bnb 4-bit: nf4 | fp4, and double quantization of the block scales.
    quant_type: str = "nf4"
    double_quant: bool = False
    # mixed: explicit overrides, applied in order (the first match wins) ...
    overrides: List[OverrideConfig] = field(default_factory=list)
    # ... and, when target_bits > 0, the most sensitive remaining layers raised to
    # promote_bits/promote_group_size while the effective bits per weight stay <= target_bits.
    target_bits: float = 0.0
    promote_bits: int = 8
    promote_group_size: int = 128


@dataclass
class QuantConfig:
    variants: Dict[str, VariantConfig] = field(default_factory=dict)


@dataclass
class LatencyConfig:
    prompt_lengths: List[int] = field(default_factory=lambda: [64, 256])
    new_tokens: int = 16
    warmup: int = 1
    repeats: int = 5
    runtime: str = "kernel"


@dataclass
class MemoryConfig:
    context_lengths: List[int] = field(default_factory=lambda: [256, 1024])
    budget_mb: float = 64.0


@dataclass
class EvalConfig:
    families: List[str] = field(
        default_factory=lambda: ["language_modelling", "structured", "retrieval", "long_context", "reasoning"]
    )
    limit: int = 64
    batch_size: int = 32
    kl_top_k: int = 32
    runtime: str = "dequantized"
    store_generations: bool = False
    golden: Optional[str] = None
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)


@dataclass
class GateConfig:
    max_perplexity_increase_pct: float = 5.0
    max_kld_mean: float = 0.05
    max_kld_p99: float = 0.5
    min_top1_agreement: float = 0.9
    max_family_drop: Dict[str, float] = field(default_factory=dict)
    max_latency_p99_ratio: Optional[float] = None
    max_peak_memory_mb: Optional[float] = None
    memory_context: int = 1024


@dataclass
class PackageConfig:
    # A PEM elliptic-curve private key: when set, the bundle is signed (OpenSSF model-signing).
    signing_key: Optional[str] = None
    # The matching public key `quantbuild verify` checks signatures with by default.
    public_key: Optional[str] = None


@dataclass
class Config:
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    package: PackageConfig = field(default_factory=PackageConfig)


def register() -> None:
    """Register the schema so `conf/config.yaml` can extend it through its defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def compose(conf_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose `conf/` with Hydra (what DVC's Hydra integration writes to params.yaml)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register()
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        composed = hydra_compose(config_name="config", overrides=overrides or [])
    return OmegaConf.to_container(composed, resolve=True)


def validate_raw(raw: Any) -> Config:
    """Validate a composed config (a plain dict) against the schema and the value ranges."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"params.yaml: missing value for {', '.join(missing)}")
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"params.yaml: {key}: {reason}") from None
    _check_ranges(config)
    return config


def load_config(params_path: Path = Path("params.yaml")) -> Config:
    """Load and validate the whole of `params.yaml`; a problem is one ConfigError line."""
    import yaml

    if not params_path.is_file():
        raise ConfigError(f"{params_path}: not found (run `quantbuild compose` to write it from conf/)")
    try:
        raw = yaml.safe_load(params_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{params_path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return validate_raw(raw)


SOURCES = ("path", "hf")
EVAL_RUNTIMES = ("dequantized", "kernel")
EVAL_FAMILIES = ("language_modelling", "structured", "retrieval", "long_context", "reasoning")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"params.yaml: {key}={value!r} is not allowed (allowed: {allowed})")


def _check_ranges(config: Config) -> None:
    from quantbuild.quantizers import check_variant

    model = config.model
    _require(model.source in SOURCES, "model.source", model.source, " | ".join(SOURCES))
    if model.source == "path":
        _require(bool(model.path), "model.path", model.path, "a local folder for source=path")
    if model.source == "hf":
        _require(bool(model.repo_id), "model.repo_id", model.repo_id, "a Hub repo id for source=hf")
        revision = model.revision or ""
        _require(len(revision) == 40 and all(c in "0123456789abcdef" for c in revision),
                 "model.revision", model.revision, "a 40-hex commit")
    _require(bool(model.files), "model.files", dict(model.files), "a map of every file to its sha256")
    for name, digest in model.files.items():
        _require(len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                 f"model.files.{name}", digest, "a 64-hex sha256")
    calibration = config.calibration
    _require(bool(calibration.sources), "calibration.sources", {}, "at least one source with a positive weight")
    for name, weight in calibration.sources.items():
        _require(weight > 0, f"calibration.sources.{name}", weight, "a weight > 0")
    _require(1 <= calibration.samples <= 100000, "calibration.samples", calibration.samples, "1..100000")
    _require(16 <= calibration.seq_len <= 32768, "calibration.seq_len", calibration.seq_len, "16..32768")
    sensitivity = calibration.sensitivity
    _require(0 <= sensitivity.samples <= calibration.samples, "calibration.sensitivity.samples", sensitivity.samples,
             f"0..calibration.samples ({calibration.samples}); 0 = not measured")
    _require(sensitivity.bits in (2, 3, 4, 8), "calibration.sensitivity.bits", sensitivity.bits, "2 | 3 | 4 | 8")
    _require(sensitivity.group_size in (-1, 32, 64, 128), "calibration.sensitivity.group_size",
             sensitivity.group_size, "-1 | 32 | 64 | 128")
    _require(bool(config.quant.variants), "quant.variants", {}, "at least one variant")
    _require("baseline" not in config.quant.variants, "quant.variants", "baseline", "any name but 'baseline'")
    for name, variant in config.quant.variants.items():
        check_variant(f"quant.variants.{name}", variant)
        if variant.target_bits > 0:
            _require(sensitivity.samples > 0, f"quant.variants.{name}.target_bits", variant.target_bits,
                     "0 (off) unless calibration.sensitivity.samples > 0 measures the layers' sensitivity")
    for family in config.eval.families:
        _require(family in EVAL_FAMILIES, "eval.families", family, " | ".join(EVAL_FAMILIES))
    _require(config.eval.limit >= 0, "eval.limit", config.eval.limit, ">= 0 (0 = every item)")
    _require(config.eval.batch_size >= 1, "eval.batch_size", config.eval.batch_size, ">= 1")
    _require(1 <= config.eval.kl_top_k <= 1024, "eval.kl_top_k", config.eval.kl_top_k, "1..1024")
    _require(config.eval.runtime in EVAL_RUNTIMES, "eval.runtime", config.eval.runtime, " | ".join(EVAL_RUNTIMES))
    latency, memory = config.eval.latency, config.eval.memory
    _require(latency.runtime in EVAL_RUNTIMES, "eval.latency.runtime", latency.runtime, " | ".join(EVAL_RUNTIMES))
    _require(all(length >= 1 for length in latency.prompt_lengths), "eval.latency.prompt_lengths",
             latency.prompt_lengths, "positive token counts")
    _require(latency.new_tokens >= 2, "eval.latency.new_tokens", latency.new_tokens, ">= 2")
    _require(latency.repeats >= 1 and latency.warmup >= 0, "eval.latency.repeats", latency.repeats,
             "repeats >= 1, warmup >= 0")
    _require(bool(memory.context_lengths) and all(n >= 1 for n in memory.context_lengths),
             "eval.memory.context_lengths", memory.context_lengths, "a non-empty list of positive token counts")
    _require(memory.budget_mb > 0, "eval.memory.budget_mb", memory.budget_mb, "> 0")
    package = config.package
    _require(not package.signing_key or bool(package.public_key), "package.public_key", package.public_key,
             "the public key matching package.signing_key (the package stage verifies what it signs)")
    gate = config.gate
    _require(gate.max_perplexity_increase_pct >= 0, "gate.max_perplexity_increase_pct",
             gate.max_perplexity_increase_pct, ">= 0")
    _require(gate.max_kld_mean >= 0, "gate.max_kld_mean", gate.max_kld_mean, ">= 0")
    _require(gate.max_kld_p99 >= 0, "gate.max_kld_p99", gate.max_kld_p99, ">= 0")
    _require(0 <= gate.min_top1_agreement <= 1, "gate.min_top1_agreement", gate.min_top1_agreement, "0..1")
    for family, drop in gate.max_family_drop.items():
        _require(family in config.eval.families and family != "language_modelling",
                 f"gate.max_family_drop.{family}", family, "a generative family listed in eval.families")
        _require(0 <= drop <= 1, f"gate.max_family_drop.{family}", drop, "0..1 (absolute drop in score)")
    if gate.max_latency_p99_ratio is not None:
        _require(gate.max_latency_p99_ratio > 0, "gate.max_latency_p99_ratio", gate.max_latency_p99_ratio, "> 0 or null")
    if gate.max_peak_memory_mb is not None:
        _require(gate.memory_context in config.eval.memory.context_lengths, "gate.memory_context",
                 gate.memory_context, f"one of eval.memory.context_lengths {config.eval.memory.context_lengths}")
