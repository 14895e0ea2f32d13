"""Build one quantized variant: validate it against the baseline, run its method, measure it.

The output folder holds `model/` (a loadable checkpoint) and `quantize_record.json` (method,
every parameter, library versions, wall time, peak memory, size, effective bits per weight
and the precision each layer got). Timings live in the record, never in `model/`, so the
weights' hashes depend only on the inputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

from quantbuild.errors import ConfigError, IntegrityError
from quantbuild.fingerprint import libraries_of
from quantbuild.hashing import digest_tree, sha256_file, staged_dir, write_json
from quantbuild.quantizers import Inputs, check_against_model, check_variant, model_layers, plan_layers
from quantbuild.runtimes import target_of

MODEL_DIR = "model"
RECORD = "quantize_record.json"
TENSOR_BITS = {"I32": 32, "F16": 16, "BF16": 16, "F32": 32, "F64": 64, "I8": 8, "U8": 8, "I64": 64, "I16": 16,
               "BOOL": 8}


def _tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                shapes[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return shapes


def effective_bits(quantized: Path, plan: dict, layers: dict) -> dict[str, Any]:
    """Bits per weight of the quantized layers, counting every tensor a layer stores besides
    its bias: codes, scales, zeros, g_idx, bitsandbytes' absmax and quantization maps."""
    stored_tensors = _tensor_shapes(quantized)
    by_layer: dict[str, int] = {name: 0 for name in plan}
    for tensor, (shape, dtype) in stored_tensors.items():
        prefix, _, part = tensor.rpartition(".")
        while prefix and prefix not in by_layer:
            prefix = prefix.rpartition(".")[0]
        if prefix and part != "bias":
            by_layer[prefix] += math.prod(shape) * TENSOR_BITS[dtype]
    total_weights = sum(layers[name][0] * layers[name][1] for name in plan)
    report = {}
    for name, precision in sorted(plan.items()):
        weights = layers[name][0] * layers[name][1]
        report[name] = {**precision, "bits_per_weight": round(by_layer[name] / weights, 4)}
    nominal = sum(plan[name]["bits"] * layers[name][0] * layers[name][1] for name in plan) / max(1, total_weights)
    return {"bits_per_weight": round(sum(by_layer.values()) / max(1, total_weights), 4),
            "nominal_bits": round(nominal, 4), "quantized_weights": total_weights, "layers": report}


def build_variant(name: str, variant: Any, inputs: Inputs, out: Path) -> dict:
    """Quantize `inputs.baseline` into `out/model` and write `out/quantize_record.json`.

    Every check (config, plan, architecture, layer widths, calibration) runs before any work.
    """
    key = f"quant.variants.{name}"
    method = check_variant(key, variant)
    layers = model_layers(inputs.baseline)
    plan = plan_layers(key, variant, layers, inputs.sensitivity, inputs.baseline)
    check_against_model(key, variant, inputs.baseline, plan, layers)
    if method.needs_calibration and not inputs.calibration:
        raise ConfigError(f"{key}: method {method.name} needs calibration data, and the calibration set is empty")
    # a planned variant's validation reports its divergence on the probes it was planned on,
    # which the calibration mix is part of (quantbuild.probes.planner_probes)
    calibration = inputs.calibration if method.needs_calibration or _uses_sensitivity(variant) else []
    with staged_dir(out) as staging:
        model_dir = staging / MODEL_DIR
        model_dir.mkdir()
        lineage = {**(inputs.lineage or {}), "variant": {"name": name, "method": method.name,
                                                         "parameters": asdict(variant)}}
        measured = method.quantize(variant, replace(inputs, calibration=calibration, lineage=lineage), plan, model_dir)
        files = digest_tree(model_dir)
        size = sum((model_dir / file).stat().st_size for file in files)
        record = {
            "variant": name,
            "method": method.name,
            "target": target_of(variant.method, variant.target),
            "parameters": asdict(variant),
            "libraries": libraries_of(method.name),
            "calibration_samples": len(calibration),
            "sensitivity_sha256": (inputs.sensitivity or {}).get("sha256") if _uses_sensitivity(variant) else None,
            # which measure made the plan: kl (measured) or weight_error (src/quantbuild/sensitivity.py)
            "sensitivity_measure": (inputs.sensitivity or {}).get("measure", "kl") if _uses_sensitivity(variant)
            else None,
            # the rows the weight-space measure scored, where it sampled them
            **({"sensitivity_row_sample": inputs.sensitivity["row_sample"]}
               if _uses_sensitivity(variant) and (inputs.sensitivity or {}).get("row_sample") else {}),
            **_planned(plan, layers, inputs.sensitivity if _uses_sensitivity(variant) else None),
            "size_bytes": size,
            "files": files,
            **(method.effective_bits or effective_bits)(model_dir, plan, layers),
            **measured,
        }
        write_json(staging / RECORD, record)
    return record


def _planned(plan: dict, layers: dict, sensitivity: dict | None) -> dict[str, Any]:
    """What the planner intended: bits per weight as planned (to compare with what was
    stored), in a repair round the objective and the plan it started from, and how many of
    its stretches the check of whole plans judged and kept."""
    if not plan or any("planned_bits_per_weight" not in entry for entry in plan.values()):
        return {}
    weights = {name: layers[name][0] * layers[name][1] for name in plan}
    planned = sum(plan[name]["planned_bits_per_weight"] * weights[name] for name in plan) / sum(weights.values())
    extra = {key: sensitivity[key] for key in ("objective", "start", "extends") if sensitivity and sensitivity.get(key)}
    check = (sensitivity or {}).get("check") if not (sensitivity or {}).get("objective") else None
    checked = {"stretches": check["stretches"], "judged": len(check["steps"]),
               "kept": sum(step["kept"] for step in check["steps"])} if check else None
    return {"planned_bits_per_weight": round(planned, 6), **({"plan_request": extra} if extra else {}),
            **({"plan_check": checked} if checked else {})}


def _uses_sensitivity(variant: Any) -> bool:
    return bool(getattr(variant, "target_bits", 0) or getattr(variant, "target_bpw", 0))


def pipeline_inputs(config: Any, variant: Any, sensitivity: Optional[dict]) -> Inputs:
    """What a pipeline build of `variant` reads: the baseline, the calibration mix, the
    variant's sensitivity table and, for GGUF, the base GGUF and the lineage a lone .gguf
    file carries in its own metadata (the file travels without its bundle)."""
    from quantbuild.calibration import RECORD as CALIBRATION_RECORD
    from quantbuild.calibration import load_calibration
    from quantbuild.fingerprint import scopes_of
    from quantbuild.hashing import read_json, sha256_json
    from quantbuild.release.manifest import SCHEMA
    from quantbuild.sources import RECORD as FETCH_RECORD

    paths = config.paths
    inputs = Inputs(baseline=Path(paths.baseline), calibration=load_calibration(Path(paths.calibration)),
                    sensitivity=sensitivity, gguf_base=Path(paths.gguf_base), imatrix=Path(paths.imatrix))
    if variant.method != "gguf":
        return inputs
    fetched = read_json(Path(paths.baseline) / FETCH_RECORD)
    calibration = read_json(Path(paths.calibration) / CALIBRATION_RECORD)
    build_scope = read_json(Path(paths.fingerprint) / f"{scopes_of(variant.method)[0]}.json")
    return replace(inputs, lineage={
        "baseline": {key: fetched.get(key) for key in ("name", "source", "location", "revision", "files")},
        "calibration": {key: calibration[key] for key in ("digest", "samples", "tokens", "seed", "composition")},
        "build_fingerprint_sha256": sha256_json(build_scope),
        "manifest_schema": SCHEMA,
    })


def require_recorded_bytes(model_dir: Path, record: dict[str, Any]) -> None:
    """Every model file of a built variant still has the sha256 its quantize record holds.
    DVC checks a rotten cache object out unchecked (iterative/dvc#9641), so the stages that read
    a variant (evaluate, package) re-hash it first."""
    for name, digest in sorted(record["files"].items()):
        path = model_dir / name
        if not path.is_file() or sha256_file(path) != digest:
            raise IntegrityError(f"{path}: sha256 differs from its quantize record (rotten, or a corrupted DVC cache "
                                 f"object checked out): `quantbuild verify --workspace --repair`, or "
                                 f"`dvc repro -f -s quantize@{record['variant']}`")
