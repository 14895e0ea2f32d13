"""Configuration schema (Hydra structured configs) and validation of `params.yaml`.

`conf/` is composed by Hydra against these dataclasses; `params.yaml` is that composition,
committed, and every stage re-validates its own section with `load_section` before any
work. Type errors, unknown keys and out-of-range values become one-line `ConfigError`s
naming the key and what is allowed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from quantbuild.errors import ConfigError
from quantbuild.tasks.tool_calls import FORMATS as TOOL_CALL_FORMATS

SCHEMA_NAME = "quantbuild_schema"
# conf/quant/*.yaml extend their method's schema: `defaults: [/quant_method@_here_: gptq]`.
METHOD_GROUP = "quant_method"


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
    gguf_base: str = "artifacts/gguf"
    # the importance matrix of the calibration mix (llama-imatrix over base.gguf) and its record
    imatrix: str = "artifacts/imatrix"
    sensitivity: str = "artifacts/sensitivity"
    repair: str = "artifacts/repair"
    # the user's golden-prompt files (eval.golden names them): a dependency of every evaluation
    golden: str = "data/golden"


@dataclass
class ModelConfig:
    name: str = "???"
    source: str = "path"
    path: Optional[str] = None
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    files: Dict[str, str] = field(default_factory=dict)
    allow_pickle: bool = False
    # the syntax an instruct model writes tool calls in (hermes | llama3_json | mistral |
    # raw_json); null = the one its chat template writes (raw_json for a base model)
    tool_call_format: Optional[str] = None


@dataclass
class SensitivityConfig:
    """Per-layer sensitivity at each candidate format of the ladder's planned variants (the
    sensitivity stage): the KL divergence when only that layer takes the format, over
    `samples` calibration samples and, per task family, the answer positions of generated
    items filling `family_tokens` tokens (0 samples = not measured; planned variants then
    fail at config time; 0 family tokens = no per-family measurement)."""

    samples: int = 4
    family_tokens: int = 1536
    # kl | weight_error | auto (weight_error for models of at least auto_weight_error_params
    # decoder weights; from 0 by default: on both bundled models its plans were as good as the
    # measured KL's at 1/12 the time, bench/README.md): src/quantbuild/sensitivity.py
    measure: str = "auto"
    auto_weight_error_params: int = 0
    # Each auto-mix promotes in this many stretches of its budget, each kept only where the
    # whole plan's KL on probes held out from the table's is lower (0: one greedy pass on the
    # table alone): quantbuild.quantizers.planner.promote_checked
    check_stretches: int = 0
    # The weight-space measure from `sample_rows_params` decoder weights up scores a sample
    # of each tensor's rows: the most influential one in 2 x row_stride whole, every
    # row_stride-th of the rest (1: every row). llama-quantize quantizes a GGUF of those rows
    # only (34% of the rows at stride 4; src/quantbuild/sensitivity.py, bench/README.md).
    row_stride: int = 4
    sample_rows_params: int = 1_000_000_000


@dataclass
class CalibrationConfig:
    sources: Dict[str, float] = field(default_factory=dict)
    # per source: render its conversations through the model's chat template (an instruct
    # model); a source not named here is rendered when its records are conversations
    chat: Dict[str, bool] = field(default_factory=dict)
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    # The importance matrix for GGUF variants: the same mix (sources, weights, seed) drawn
    # to this many samples, cut into chunks of `imatrix_chunk` tokens (llama-imatrix -c).
    imatrix_samples: int = 600
    imatrix_chunk: int = 512


@dataclass
class GgufBaseConfig:
    """The baseline's GGUF that gguf variants are quantized from and measured against."""

    base_type: str = "f16"


@dataclass
class OverrideConfig:
    """Layers whose full name matches `pattern` (a regular expression, whole name) get
    `bits`/`group_size` instead of the variant's."""

    pattern: str = "???"
    bits: int = 8
    group_size: int = 128


# One typed config per quantization method: a variant holds only its method's keys, and a
# key of another method fails at composition (Hydra) and at validation, naming the key.
@dataclass
class RtnConfig:
    """Round-to-nearest through GPTQModel's RTN, GPTQ checkpoint format."""

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    # The deploy target it ships for (null: the method's default); see quantbuild.runtimes.
    target: Optional[str] = None


@dataclass
class GptqConfig:
    """GPTQ through GPTQModel, GPTQ checkpoint format."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.05
    # The deploy target it ships for (null: the method's default); see quantbuild.runtimes.
    target: Optional[str] = None


@dataclass
class AwqConfig:
    """AWQ through GPTQModel, AutoAWQ GEMM format (4-bit only)."""

    method: str = "awq"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    # The deploy target it ships for (null: the method's default); see quantbuild.runtimes.
    target: Optional[str] = None


@dataclass
class BnbConfig:
    """bitsandbytes through transformers: NF4/FP4 at 4 bits (block 64), LLM.int8 at 8."""

    method: str = "bnb"
    bits: int = 4
    group_size: int = 64
    quant_type: str = "nf4"
    double_quant: bool = False
    # The deploy target it ships for (null: the method's default); see quantbuild.runtimes.
    target: Optional[str] = None


@dataclass
class MixedConfig(GptqConfig):
    """GPTQ with per-layer precision: explicit `overrides` (applied in order, the first match
    wins) and, when `target_bits` > 0, the most sensitive remaining layers raised to
    `promote_bits`/`promote_group_size` while the effective bits per weight stay within it."""

    method: str = "mixed"
    overrides: List[OverrideConfig] = field(default_factory=list)
    target_bits: float = 0.0
    promote_bits: int = 8
    promote_group_size: int = 128


@dataclass
class GgufOverrideConfig:
    """GGUF tensors whose full name matches `pattern` (a regular expression over names such
    as `blk.3.ffn_down.weight`) get the llama.cpp tensor type `type` (e.g. Q6_K)."""

    pattern: str = "???"
    type: str = "Q8_0"


@dataclass
class GgufConfig:
    """llama.cpp: the baseline converted to GGUF and quantized by llama.cpp's own quantizer.

    `type` is a llama.cpp file type (Q4_K_M, IQ4_XS, ...); `imatrix` uses the importance
    matrix computed from the project's calibration mix; `token_embd_type`/`output_type`
    set those tensors' types (null: llama.cpp's choice); `overrides` set per-tensor types;
    `target_bpw` > 0 chooses per-tensor types from measured sensitivity among `mix_types`
    (cheapest first) so that the decoder's bits per weight stay within it. `kv_cache_type`
    is the KV-cache type the variant is evaluated and shipped with.
    """

    method: str = "gguf"
    type: str = "Q4_K_M"
    imatrix: bool = False
    token_embd_type: Optional[str] = None
    output_type: Optional[str] = None
    overrides: List[GgufOverrideConfig] = field(default_factory=list)
    target_bpw: float = 0.0
    mix_types: List[str] = field(default_factory=lambda: ["Q3_K", "Q4_K", "Q5_K", "Q6_K"])
    kv_cache_type: str = "f16"
    # An auto-mix (target_bpw > 0) is measured on this many tokens of held-out validation
    # text (a third each of eval-family, calibration-like and prose text) beside llama.cpp's
    # stock presets its target's size holds, and replaced by one of them where the plan is
    # worse than the best of them on any text and another file within that size is not
    # (quantbuild.plan_validation); 0: not validated.
    validation_tokens: int = 16384
    # The deploy target it ships for (null: the method's default); see quantbuild.runtimes.
    target: Optional[str] = None


@dataclass
class DenseConfig:
    """The baseline at its own precision on the torch runtime (float16 | bfloat16): what a
    torch ladder's gate keeps when no quantized variant passes (gate.fallback: baseline)."""

    method: str = "dense"
    bits: int = 16
    group_size: int = -1
    dtype: str = "float16"
    # The deploy target it ships for (null: the method's default); see quantbuild.runtimes.
    target: Optional[str] = None


METHOD_CONFIGS: Dict[str, type] = {
    "rtn": RtnConfig, "gptq": GptqConfig, "awq": AwqConfig, "bnb": BnbConfig, "mixed": MixedConfig,
    "gguf": GgufConfig, "dense": DenseConfig,
}


@dataclass
class QuantConfig:
    # name -> one of METHOD_CONFIGS, chosen by its `method` key (validated per method).
    variants: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LatencyConfig:
    prompt_lengths: List[int] = field(default_factory=lambda: [64, 256])
    new_tokens: int = 16
    warmup: int = 1
    repeats: int = 5
    # Interleaved with the baseline and given the gate's bound (limit + noise margin): while a
    # ratio's interval reaches both sides of it, `repeats` more rounds, up to this many per
    # prompt length; a ratio still undecided there is recorded so, and is not released.
    max_rounds: int = 60
    runtime: str = "kernel"


@dataclass
class SequentialConfig:
    # A variant's gated families answered in steps of these many items (the eval file's
    # order), each stopping once the paired interval at `z` decides the gate's verdict on it
    # (quantbuild.evaluation.sequential); [] answers every item. The baseline answers all.
    looks: List[int] = field(default_factory=lambda: [100, 200])
    z: float = 3.0


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
    # Language modelling as llama-perplexity --kl-divergence measures it: the texts as one
    # stream, chunks of kl_context tokens (BOS first), the second half of each scored.
    kl_context: int = 512
    # The reference keeps whole distributions (exact KLD) up to this vocabulary size, else
    # the top kl_top_k log-probabilities and the tail mass.
    kl_full_vocab: int = 8192
    runtime: str = "dequantized"
    # The deploy targets the ladder is validated for: its runtime on a kind of device
    # (llama.cpp-cpu | llama.cpp-cuda for a GGUF ladder, torch-cpu | torch-cuda for a torch
    # one). Every variant is measured on each, the gate decides per target, and the first is
    # the primary (decision.json's `chosen`). A target this machine lacks is refused before
    # any work.
    targets: List[str] = field(default_factory=lambda: ["llama.cpp-cpu"])
    # GPTQModel's kernel per checkpoint format on a CUDA GPU (on a CPU it uses its torch
    # kernels). Triton, because the automatic choice on Hopper (Machete) compiles at first
    # load and downloads CUTLASS for it, which an offline machine cannot.
    gpu_kernels: Dict[str, str] = field(default_factory=lambda: {"gptq": "gptq_triton", "awq": "awq_gemm_triton"})
    # llama.cpp threads for every suite; 0 = the cores free when the evaluation starts (the
    # cores less those busy over half a second, at least 1): threads beyond the free cores
    # wait at every barrier for a core another job holds. The numbers do not depend on it.
    threads: int = 0
    store_generations: bool = False
    # The user's golden prompts, one family each: {family name: a JSONL file in paths.golden}.
    # Scored and gated like the generated families (gate.max_family_drop, must_not_degrade).
    golden: Dict[str, str] = field(default_factory=dict)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    sequential: SequentialConfig = field(default_factory=SequentialConfig)


FALLBACKS = ("baseline", "none")


@dataclass
class GateConfig:
    max_perplexity_increase_pct: float = 5.0
    max_kld_mean: float = 0.05
    max_kld_p99: float = 0.5
    min_top1_agreement: float = 0.9
    # Per family: a budget on the drop in score (baseline - variant on the same items). It
    # applies to the upper end of the drop's paired 95% interval.
    max_family_drop: Dict[str, float] = field(default_factory=dict)
    # Families that may not degrade at all: they fail when the paired interval shows a drop
    # (its lower end above zero).
    must_not_degrade: List[str] = field(default_factory=list)
    # Degenerate outputs (loops, no stop within the budget, a foreign script) over every
    # generative item: fails when the paired interval of the share of degenerate items
    # shows more than this increase over the baseline (its lower end); null = unchecked.
    max_degenerate_increase: Optional[float] = 0.0
    # A tail ceiling from the latency suites, each run in its own stage (noisy: reaches 3x on
    # the baseline against itself); null = unchecked.
    max_latency_p99_ratio: Optional[float] = None
    # "Not slower": the variant/baseline ratio of TTFT and of decode time per token, timed
    # interleaved in one process on the deploy runtime, against the limit plus
    # `latency_noise_margin`: passes when the interval lies at or below it, fails when wholly
    # above, and is undecided (not released) otherwise; null = unchecked.
    max_latency_paired_ratio: Optional[float] = 1.0
    latency_noise_margin: float = 0.05
    max_peak_memory_mb: Optional[float] = None
    memory_context: int = 1024
    # A measured operational win: the variant's model memory (weights, KV cache, runtime
    # buffers at memory_context) over the baseline's, on the same runtime; null = unchecked.
    max_memory_ratio: Optional[float] = None
    # When no quantized variant passes: `baseline` releases the ladder's baseline-precision
    # variant (a GGUF F16/BF16/F32, validated on the same runtime) if it has one; `none`
    # releases nothing and the select stage fails.
    fallback: str = "baseline"


@dataclass
class RepairConfig:
    """The closed loop (repair stage): a planned variant (GGUF auto-mix, GPTQ mixed) that
    fails only family budgets is re-planned from its own plan, raising the layers most
    sensitive on the failing families by KL removed per extra stored bit, `step_bits` more
    bits per weight a round, rebuilt and re-gated; at most `max_rounds` rounds and never
    above `max_bits_per_weight` (0 rounds = off)."""

    max_rounds: int = 3
    max_bits_per_weight: float = 4.25
    step_bits: float = 0.25


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
    gguf: GgufBaseConfig = field(default_factory=GgufBaseConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    package: PackageConfig = field(default_factory=PackageConfig)


def register() -> None:
    """Register the schema so `conf/config.yaml` can extend it through its defaults list."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=Config)
    for method, schema in METHOD_CONFIGS.items():
        store.store(group=METHOD_GROUP, name=method, node=schema)


# params.yaml's first line when `quantbuild compose` applied overrides: they stay applied
OVERRIDES_LINE = "# quantbuild compose overrides: "


def recorded_overrides(params: Path) -> list[str]:
    """The overrides `params` was composed with (its first line), or none."""
    first = params.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
    if not first.startswith(OVERRIDES_LINE):
        return []
    try:
        recorded = json.loads(first[len(OVERRIDES_LINE):])
    except ValueError:
        raise ConfigError(f"{params}: its first line does not parse as the overrides quantbuild recorded "
                          f"(`quantbuild compose --reset` starts again)") from None
    return [str(item) for item in recorded] if isinstance(recorded, list) else []


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(before: list[str], new: list[str]) -> list[str]:
    """`before` with each key that `new` sets again replaced, then `new`, in order."""
    keys = {_override_key(override) for override in new}
    return [override for override in before if _override_key(override) not in keys] + list(new)


def params_text(composed: dict[str, Any], overrides: list[str]) -> str:
    """params.yaml's text: the composition, after a line recording `overrides` where any."""
    header = f"{OVERRIDES_LINE}{json.dumps(overrides)}\n" if overrides else ""
    return header + yaml.safe_dump(composed, sort_keys=False)


def params_changes(before: Optional[dict[str, Any]], after: dict[str, Any], limit: int = 12) -> list[str]:
    """`key: old -> new` for each leaf that differs between two compositions (at most `limit`)."""
    if before is None:
        return []

    def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict) and value:
            return {key: leaf for name, item in value.items() for key, leaf in leaves(item, f"{prefix}{name}.").items()}
        return {prefix.rstrip("."): value}

    def brief(value: Any) -> str:
        text = json.dumps(value, default=str)
        return text if len(text) <= 40 else text[:37] + "..."

    old, new = leaves(before), leaves(after)
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key, "<unset>") != new.get(key, "<unset>")]
    lines = [f"{key}: {brief(old.get(key, '<unset>'))} -> {brief(new.get(key, '<unset>'))}" for key in changed[:limit]]
    return lines + ([f"... and {len(changed) - limit} more"] if len(changed) > limit else [])


def compose(conf_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose `conf/` with Hydra (what DVC's Hydra integration writes to params.yaml); an
    unknown group option, a bad override or a key of another method is one ConfigError line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register()
    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
            composed = hydra_compose(config_name="config", overrides=overrides or [])
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
        reason = (str(getattr(cause, "msg", cause)).strip().splitlines() or ["composition failed"])[0]
        key = getattr(cause, "full_key", None)
        raise ConfigError(f"{conf_dir}: {key + ': ' if key else ''}{reason}") from None
    return OmegaConf.to_container(composed, resolve=True)


def _omegaconf_error(err: Exception, prefix: str = "") -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    reason = str(getattr(err, "msg", err)).splitlines()[0]
    return ConfigError(f"params.yaml: {prefix}{key}: {reason}")


def _typed_variant(name: str, raw: Any) -> Any:
    """One variant as its method's dataclass; a key of another method is named."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key = f"quant.variants.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: {key}: expected a mapping of the variant's keys, got {raw!r}")
    method = raw.get("method")
    if method not in METHOD_CONFIGS:
        raise ConfigError(f"params.yaml: {key}.method={method!r} is not allowed "
                          f"(allowed: {' | '.join(sorted(METHOD_CONFIGS))})")
    schema = METHOD_CONFIGS[method]
    known = set(schema.__dataclass_fields__)
    for field_name in sorted(set(raw) - known):
        owners = sorted(other for other, cls in METHOD_CONFIGS.items() if field_name in cls.__dataclass_fields__)
        where = f"a key of {' | '.join(owners)}" if owners else "no method has it"
        raise ConfigError(f"params.yaml: {key}.{field_name} is not a key of method {method} ({where}; "
                          f"{method} takes: {', '.join(sorted(known))})")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, f"{key}.") from None


def parse(raw: Any) -> Config:
    """A composed config (a plain dict) checked against the schema and this module's own
    value ranges. The rules that need the method registry or the deploy targets are
    `quantbuild.validation`'s, which every caller goes through."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"params.yaml: missing value for {', '.join(missing)}")
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err) from None
    config.quant.variants = {name: _typed_variant(name, variant) for name, variant in config.quant.variants.items()}
    _check_ranges(config)
    return config


def read_params(params_path: Path = Path("params.yaml")) -> Any:
    """`params.yaml` as a plain dict; a missing or malformed file is one ConfigError line."""
    import yaml

    if not params_path.is_file():
        raise ConfigError(f"{params_path}: not found (run `quantbuild compose` to write it from conf/)")
    try:
        raw = yaml.safe_load(params_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{params_path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return raw


SOURCES = ("path", "hf")
EVAL_RUNTIMES = ("dequantized", "kernel")
# runtime-device; validation checks the runtime is the ladder's
EVAL_TARGETS = ("llama.cpp-cpu", "llama.cpp-cuda", "torch-cpu", "torch-cuda")
# checkpoint formats GPTQModel loads (quantize_config.json `quant_method`)
GPU_KERNEL_FORMATS = ("gptq", "awq")
EVAL_FAMILIES = ("language_modelling", "structured", "retrieval", "long_context", "reasoning")


def _confined(name: str) -> bool:
    """A name that, joined to its folder, stays inside it."""
    from pathlib import PurePosixPath

    pure = PurePosixPath(name)
    return bool(name) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in name and "\0" not in name


GOLDEN_NAME = r"[a-z][a-z0-9_]{0,39}"


def _check_golden(config: Any) -> None:
    """eval.golden: each family a new lowercase name, each file a JSONL inside paths.golden
    (so the evaluate stages' dependency on that folder covers it)."""
    import re

    from quantbuild.tasks.items import FAMILIES

    folder = Path(config.paths.golden)
    for family, file in config.eval.golden.items():
        _require(re.fullmatch(GOLDEN_NAME, family) is not None and family not in set(FAMILIES) - {"golden"},
                 f"eval.golden.{family}", family, "a new family name: lowercase letters, digits and _, not one of "
                 + ", ".join(name for name in FAMILIES if name != "golden"))
        path = Path(file)
        inside = path.resolve().is_relative_to(folder.resolve())
        _require(inside and path.suffix == ".jsonl", f"eval.golden.{family}", file,
                 f"a .jsonl file inside {folder}/ (paths.golden: a dependency of every evaluation)")
        _require(path.is_file(), f"eval.golden.{family}", file, "an existing file")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"params.yaml: {key}={value!r} is not allowed (allowed: {allowed})")


def _check_ranges(config: Config) -> None:
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
        _require(_confined(name), f"model.files.{name!r}", name,
                 "a relative path inside the model folder: no '..', no absolute path, no backslash or NUL")
        _require(len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                 f"model.files.{name}", digest, "a 64-hex sha256")
    _require(model.tool_call_format is None or model.tool_call_format in TOOL_CALL_FORMATS, "model.tool_call_format",
             model.tool_call_format, "null (from the chat template) | " + " | ".join(TOOL_CALL_FORMATS))
    calibration = config.calibration
    _require(bool(calibration.sources), "calibration.sources", {}, "at least one source with a positive weight")
    for name, weight in calibration.sources.items():
        _require(math.isfinite(weight) and weight > 0, f"calibration.sources.{name}", weight, "a finite weight > 0")
        _require(_confined(name) and "/" not in name, f"calibration.sources.{name!r}", name,
                 "a file name in paths.calibration_data, without a folder")
    for name, switch in calibration.chat.items():
        _require(name in calibration.sources and isinstance(switch, bool), f"calibration.chat.{name}", switch,
                 "true | false, for a source listed in calibration.sources")
    _require(1 <= calibration.samples <= 100000, "calibration.samples", calibration.samples, "1..100000")
    _require(16 <= calibration.seq_len <= 32768, "calibration.seq_len", calibration.seq_len, "16..32768")
    sensitivity = calibration.sensitivity
    _require(0 <= sensitivity.samples <= calibration.samples, "calibration.sensitivity.samples", sensitivity.samples,
             f"0..calibration.samples ({calibration.samples}); 0 = not measured")
    _require(0 <= sensitivity.family_tokens <= 65536, "calibration.sensitivity.family_tokens",
             sensitivity.family_tokens, "0..65536 (0 = no per-family measurement)")
    _require(sensitivity.measure in ("auto", "kl", "weight_error"), "calibration.sensitivity.measure",
             sensitivity.measure, "auto | kl | weight_error")
    _require(sensitivity.auto_weight_error_params >= 0, "calibration.sensitivity.auto_weight_error_params",
             sensitivity.auto_weight_error_params, ">= 0")
    _require(1 <= sensitivity.row_stride <= 64, "calibration.sensitivity.row_stride", sensitivity.row_stride,
             "1..64 (1 = every row)")
    _require(sensitivity.sample_rows_params >= 0, "calibration.sensitivity.sample_rows_params",
             sensitivity.sample_rows_params, ">= 0")
    _require(0 <= sensitivity.check_stretches <= 64, "calibration.sensitivity.check_stretches",
             sensitivity.check_stretches, "0..64 (0 = plans are not checked whole)")
    _require(1 <= calibration.imatrix_samples <= 1000000, "calibration.imatrix_samples", calibration.imatrix_samples,
             "1..1000000")
    _require(32 <= calibration.imatrix_chunk <= 32768, "calibration.imatrix_chunk", calibration.imatrix_chunk,
             "32..32768 tokens")
    _require(config.gguf.base_type in ("f16", "bf16", "f32"), "gguf.base_type", config.gguf.base_type,
             "f16 | bf16 | f32")
    _require(config.eval.threads >= 0, "eval.threads", config.eval.threads, ">= 0 (0 = the cores free)")
    _require(bool(config.quant.variants), "quant.variants", {}, "at least one variant")
    _require("baseline" not in config.quant.variants, "quant.variants", "baseline", "any name but 'baseline'")
    for name, variant in config.quant.variants.items():
        target = "target_bpw" if variant.method == "gguf" else "target_bits"
        if getattr(variant, target, 0) > 0:
            _require(sensitivity.samples > 0, f"quant.variants.{name}.{target}", getattr(variant, target),
                     "0 (off) unless calibration.sensitivity.samples > 0 measures the layers' sensitivity")
    for family in config.eval.families:
        _require(family in EVAL_FAMILIES, "eval.families", family, " | ".join(EVAL_FAMILIES))
    _require(config.eval.limit >= 0, "eval.limit", config.eval.limit, ">= 0 (0 = every item)")
    _require(config.eval.batch_size >= 1, "eval.batch_size", config.eval.batch_size, ">= 1")
    _require(1 <= config.eval.kl_top_k <= 1024, "eval.kl_top_k", config.eval.kl_top_k, "1..1024")
    _require(16 <= config.eval.kl_context <= 32768, "eval.kl_context", config.eval.kl_context, "16..32768 tokens")
    _require(0 <= config.eval.kl_full_vocab <= 262144, "eval.kl_full_vocab", config.eval.kl_full_vocab,
             "0..262144 (0 = always top-k)")
    _require(config.eval.runtime in EVAL_RUNTIMES, "eval.runtime", config.eval.runtime, " | ".join(EVAL_RUNTIMES))
    _require(bool(config.eval.targets), "eval.targets", [], "at least one deploy target")
    for target in config.eval.targets:
        _require(target in EVAL_TARGETS, "eval.targets", target, " | ".join(EVAL_TARGETS))
    _require(len(set(config.eval.targets)) == len(config.eval.targets), "eval.targets", config.eval.targets,
             "each target once")
    for checkpoint, kernel in config.eval.gpu_kernels.items():
        _require(checkpoint in GPU_KERNEL_FORMATS, "eval.gpu_kernels", checkpoint, " | ".join(GPU_KERNEL_FORMATS))
        _require(isinstance(kernel, str) and kernel.startswith(f"{checkpoint}_"), f"eval.gpu_kernels.{checkpoint}",
                 kernel, f"a GPTQModel backend for {checkpoint} checkpoints ({checkpoint}_...: gptq_triton, "
                 "awq_gemm_triton, ...)")
    latency, memory = config.eval.latency, config.eval.memory
    _require(latency.runtime in EVAL_RUNTIMES, "eval.latency.runtime", latency.runtime, " | ".join(EVAL_RUNTIMES))
    _require(all(length >= 1 for length in latency.prompt_lengths), "eval.latency.prompt_lengths",
             latency.prompt_lengths, "positive token counts")
    _require(latency.new_tokens >= 2, "eval.latency.new_tokens", latency.new_tokens, ">= 2")
    _require(latency.repeats >= 1 and latency.warmup >= 0, "eval.latency.repeats", latency.repeats,
             "repeats >= 1, warmup >= 0")
    _require(latency.repeats <= latency.max_rounds <= 10000, "eval.latency.max_rounds", latency.max_rounds,
             f"eval.latency.repeats ({latency.repeats}) .. 10000")
    sequential = config.eval.sequential
    _require(all(isinstance(look, int) and look >= 1 for look in sequential.looks), "eval.sequential.looks",
             sequential.looks, "positive item counts ([] answers every item)")
    # a look may not be laxer than the gate's final 95% interval
    _require(1.96 <= sequential.z <= 10, "eval.sequential.z", sequential.z, "1.96 .. 10")
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
    _check_golden(config)
    gated = {family for family in config.eval.families if family != "language_modelling"} | set(config.eval.golden)
    for family, drop in gate.max_family_drop.items():
        _require(family in gated, f"gate.max_family_drop.{family}", family,
                 "a generative family listed in eval.families, or a golden family named in eval.golden")
        _require(0 <= drop <= 1, f"gate.max_family_drop.{family}", drop, "0..1 (absolute drop in score)")
    if gate.max_latency_p99_ratio is not None:
        _require(gate.max_latency_p99_ratio > 0, "gate.max_latency_p99_ratio", gate.max_latency_p99_ratio, "> 0 or null")
    if gate.max_latency_paired_ratio is not None:
        _require(gate.max_latency_paired_ratio > 0, "gate.max_latency_paired_ratio", gate.max_latency_paired_ratio,
                 "> 0 or null")
    if gate.max_memory_ratio is not None:
        _require(gate.max_memory_ratio > 0, "gate.max_memory_ratio", gate.max_memory_ratio, "> 0 or null")
    for family in gate.must_not_degrade:
        _require(family in gated, "gate.must_not_degrade", family,
                 "generative families listed in eval.families, or golden families named in eval.golden")
        _require(family not in gate.max_family_drop, "gate.must_not_degrade", family,
                 "families without a budget in gate.max_family_drop (a family has one rule)")
    if gate.max_degenerate_increase is not None:
        _require(0 <= gate.max_degenerate_increase <= 1, "gate.max_degenerate_increase", gate.max_degenerate_increase,
                 "0..1 (share of items) or null")
    _require(0 <= gate.latency_noise_margin < 1, "gate.latency_noise_margin", gate.latency_noise_margin, "0 <= m < 1")
    _require(gate.fallback in FALLBACKS, "gate.fallback", gate.fallback, " | ".join(FALLBACKS))
    repair = config.repair
    _require(0 <= repair.max_rounds <= 10, "repair.max_rounds", repair.max_rounds, "0..10 (0 = off)")
    _require(1 < repair.max_bits_per_weight <= 16, "repair.max_bits_per_weight", repair.max_bits_per_weight,
             "1 < bits <= 16")
    _require(0 < repair.step_bits <= 8, "repair.step_bits", repair.step_bits, "0 < bits <= 8")
    if gate.max_peak_memory_mb is not None or gate.max_memory_ratio is not None:
        _require(gate.memory_context in config.eval.memory.context_lengths, "gate.memory_context",
                 gate.memory_context, f"one of eval.memory.context_lengths {config.eval.memory.context_lengths}")
