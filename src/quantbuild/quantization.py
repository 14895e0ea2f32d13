"""Build one quantized variant: validate it against the baseline, run its method, measure it.

The output folder holds `model/` (a loadable checkpoint) and `quantize_record.json` (method,
every parameter, library versions, wall time, peak memory, size, effective bits per weight
and the precision each layer got). Timings live in the record, never in `model/`, so the
weights' hashes depend only on the inputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quantbuild.config import VariantConfig
from quantbuild.errors import ConfigError
from quantbuild.fingerprint import BUILD_PACKAGES, package_versions
from quantbuild.hashing import digest_tree, staged_dir, write_json
from quantbuild.quantizers import check_against_model, check_variant

MODEL_DIR = "model"
RECORD = "quantize_record.json"
TENSOR_BITS = {"I32": 32, "F16": 16, "BF16": 16, "F32": 32, "I8": 8, "U8": 8, "I64": 64, "I16": 16}


def layer_widths(baseline: Path) -> dict[str, int]:
    """Input widths of the decoder's linear layers, from the model's config.json."""
    config = json.loads((baseline / "config.json").read_text())
    return {"hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"]}


def _tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                shapes[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return shapes


def effective_bits(baseline: Path, quantized: Path, bits: int, group_size: int) -> dict[str, Any]:
    """Bits per weight of the quantized layers, counting codes, scales, zeros and g_idx."""
    original = _tensor_shapes(baseline)
    packed = _tensor_shapes(quantized)
    total_bits, total_weights, layers = 0, 0, {}
    for name in sorted(packed):
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        shape, _ = original[f"{prefix}.weight"]
        weights = shape[0] * shape[1]
        stored = sum(
            math.prod(packed[f"{prefix}.{part}"][0]) * TENSOR_BITS[packed[f"{prefix}.{part}"][1]]
            for part in ("qweight", "qzeros", "scales", "g_idx")
            if f"{prefix}.{part}" in packed
        )
        layers[prefix] = {"bits": bits, "group_size": group_size, "bits_per_weight": round(stored / weights, 4)}
        total_bits += stored
        total_weights += weights
    return {"bits_per_weight": round(total_bits / max(1, total_weights), 4), "quantized_weights": total_weights,
            "layers": layers}


def build_variant(name: str, variant: VariantConfig, baseline: Path, calibration: list[list[int]], out: Path) -> dict:
    """Quantize `baseline` into `out/model` and write `out/quantize_record.json`."""
    key = f"quant.variants.{name}"
    method = check_variant(key, variant)
    check_against_model(key, variant, layer_widths(baseline))
    if method.needs_calibration and not calibration:
        raise ConfigError(f"{key}: method {method.name} needs calibration data, and the calibration set is empty")
    with staged_dir(out) as staging:
        model_dir = staging / MODEL_DIR
        model_dir.mkdir()
        measured = method.quantize(variant, baseline, calibration if method.needs_calibration else [], model_dir)
        files = digest_tree(model_dir)
        size = sum((model_dir / file).stat().st_size for file in files)
        record = {
            "variant": name,
            "method": method.name,
            "parameters": asdict(variant),
            "libraries": package_versions(BUILD_PACKAGES),
            "calibration_samples": len(calibration) if method.needs_calibration else 0,
            "size_bytes": size,
            "files": files,
            **effective_bits(baseline, model_dir, variant.bits, variant.group_size),
            **measured,
        }
        write_json(staging / RECORD, record)
    return record
