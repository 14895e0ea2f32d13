"""Sensitivity from a sample of rows: is each tensor's importance-weighted quantization error
estimated well from a GGUF of every k-th row, quantized by llama-quantize?

    python bench/row_sample.py [--model data/baseline/workflow-chat-33m] [--strides 4 8] [--types Q4_K IQ4_XS Q3_K]
    python bench/row_sample.py --pipeline [3.5 4.0 4.5] [--model ...] [--strides 4 8]

The weight-space sensitivity (`calibration.sensitivity.measure: weight_error`) quantizes the
whole decoder once per candidate type with llama-quantize and reads it back: at 8B minutes per
type. Every quantized block is one row's, so a "thumbnail" GGUF holding every k-th row of each
decoder tensor (the rest of the file as it is: `runtimes.gguf_file.with_rows`) should quantize to exactly those rows of the
full file, at 1/k of the work. This prints, per model, type and stride, against the full
decoder quantized in the same run: the quantize seconds, whether every sampled row is
bit-identical, and how well the sample estimates each tensor's error sum
E = sum over rows and columns of imatrix[column] * (quantized - weight)^2 (k times the
sample's sum): median and worst relative error over the tensors, and the Spearman rank
correlation of the tensors' E (what the planner ranks). "stratified": the stage's
`sensitivity.RowSample`, ranking rows by their sum of imatrix * weight^2: one in 2k kept
whole, every k-th of the rest sampled.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, save, table

BASELINE = ROOT / "data" / "baseline" / "workflow-llama-8m"


def _gguf():
    from quantbuild.runtimes.llama_build import vendored_converter

    vendored_converter()
    import gguf

    return gguf


def prepare(model: Path, work: Path) -> tuple[Path, Path]:
    """(base.gguf, imatrix.gguf) of `model`, as the pipeline makes them."""
    from quantbuild.config import CalibrationConfig
    from quantbuild.gguf_artifacts import BASE_FILE, IMATRIX_FILE
    from quantbuild.gguf_base import build_base, build_imatrix

    calibration = CalibrationConfig(sources={"workflow_prompts": 0.4, "tool_calls": 0.25, "long_context": 0.15,
                                             "domain_text": 0.2}, samples=48, seq_len=512, imatrix_samples=600)
    build_base(model, "f16", needed=True, out=work / "base")
    build_imatrix(work / "base", model, calibration, ROOT / "data" / "calibration", needed=True, repack=False,
                  out=work / "imatrix")
    return work / "base" / BASE_FILE, work / "imatrix" / IMATRIX_FILE


def decoder_tensors(base: Path) -> dict[str, tuple[int, int]]:
    """The decoder's 2-D weights: GGUF name -> (rows, columns)."""
    gguf = _gguf()
    return {t.name: (int(t.shape[1]), int(t.shape[0])) for t in gguf.GGUFReader(base).tensors
            if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}


def quantize(source: Path, names: list[str], kind: str, imatrix: Path, out: Path) -> float:
    from quantbuild.runtimes.llama_build import cores, tool

    types = out.with_suffix(".types.txt")
    types.write_text("".join(f"{name.removesuffix('.weight')}={kind.lower()}\n" for name in names))
    started = time.perf_counter()
    subprocess.run([str(tool("llama-quantize")), "--imatrix", str(imatrix), "--tensor-type-file", str(types),
                    str(source), str(out), "Q8_0", str(cores())], check=True, capture_output=True)
    return time.perf_counter() - started


def weights(path: Path, names: list[str]) -> dict:
    import numpy as np

    gguf = _gguf()
    found = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name in names:
            values = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
            found[t.name] = np.asarray(values, dtype=np.float64).reshape(int(t.shape[1]), int(t.shape[0]))
    return found


def importance(imatrix: Path, names: list[str]) -> dict:
    """Per tensor: each input column's mean squared activation (the imatrix's in_sum2 / counts)."""
    import numpy as np

    gguf = _gguf()
    stored = {t.name: np.array(t.data, dtype=np.float64).ravel() for t in gguf.GGUFReader(imatrix).tensors}
    return {name: stored[f"{name}.in_sum2"] / max(1.0, float(stored[f"{name}.counts"].ravel()[0]))
            for name in names if f"{name}.in_sum2" in stored}


def spearman(first: list[float], second: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        ranked = [0.0] * len(values)
        for rank, index in enumerate(order):
            ranked[index] = float(rank)
        return ranked

    a, b = ranks(first), ranks(second)
    mean = (len(a) - 1) / 2
    top = sum((x - mean) * (y - mean) for x, y in zip(a, b))
    bottom = (sum((x - mean) ** 2 for x in a) * sum((y - mean) ** 2 for y in b)) ** 0.5
    return top / bottom if bottom else 1.0


def run_model(model: Path, strides: list[int], kinds: list[str], work: Path) -> tuple[list[list], dict]:
    import numpy as np

    from quantbuild.runtimes.gguf_file import with_rows
    from quantbuild.sensitivity import RowSample

    base, imatrix = prepare(model, work)
    shapes = decoder_tensors(base)
    names = sorted(shapes)
    base_w = weights(base, names)
    imp = importance(imatrix, names)
    names = [name for name in names if name in imp]
    rows_out, raw = [], {}
    for kind in kinds:
        full_path = work / f"full-{kind}.gguf"
        full_seconds = quantize(base, names, kind, imatrix, full_path)
        full_q = weights(full_path, names)
        errors = {name: (full_q[name] - base_w[name]) ** 2 * imp[name][None, :] for name in names}
        exact = {name: float(errors[name].sum()) for name in names}
        for stride in strides:
            for scheme in ("every k-th row", "stratified"):
                if scheme == "every k-th row":
                    picked = {name: np.arange(0, shapes[name][0], stride) for name in names}
                    weight_of = {name: np.full(len(picked[name]), shapes[name][0] / len(picked[name])) for name in names}
                else:  # the sensitivity stage's sample, rows ranked by imatrix x weight^2 (GGUF rows: no
                    # orientation to map them through)
                    sample = RowSample({name: (base_w[name] ** 2 * imp[name][None, :]).sum(axis=1) for name in names},
                                       stride, {})
                    picked, weight_of = sample.rows, sample.weights
                thumb = work / f"thumb-{stride}-{scheme[0]}.gguf"
                started = time.perf_counter()
                with_rows(base, picked, thumb)
                written = time.perf_counter() - started
                thumb_q_path = work / f"thumb-{kind}-{stride}-{scheme[0]}.gguf"
                thumb_seconds = quantize(thumb, names, kind, imatrix, thumb_q_path)
                thumb_q = weights(thumb_q_path, names)
                identical = sum(np.array_equal(thumb_q[name], full_q[name][picked[name]]) for name in names)
                estimate = {name: float((errors[name][picked[name]].sum(axis=1) * weight_of[name]).sum())
                            for name in names}
                relative = [abs(estimate[name] / exact[name] - 1) for name in names if exact[name] > 0]
                rho = spearman([exact[name] for name in names], [estimate[name] for name in names])
                rows_out.append([model.name, kind, stride, scheme, f"{full_seconds:.2f}",
                                 f"{thumb_seconds:.2f} (+{written:.2f} write)", f"{identical}/{len(names)}",
                                 f"{100 * statistics.median(relative):.2f}%", f"{100 * max(relative):.2f}%",
                                 f"{rho:.4f}"])
                raw[f"{model.name}/{kind}/{stride}/{scheme}"] = {
                    "full_seconds": full_seconds, "thumb_seconds": thumb_seconds, "write_seconds": written,
                    "identical": identical, "tensors": len(names), "median_relative": statistics.median(relative),
                    "max_relative": max(relative), "spearman": rho}
                thumb.unlink()
                thumb_q_path.unlink()
        full_path.unlink()
    return rows_out, raw


def run_pipeline(model: Path, strides: list[int], targets: list[float], work: Path) -> tuple[list[list], dict]:
    """The sensitivity stage's weight-space measure (`sensitivity.measure`) on every row and
    from each stride's sample (forced on at any size), the demo mix's types: its seconds,
    how far each layer/type/probe-set value moves, and the plans each table makes."""
    from dataclasses import replace

    from quantbuild.calibration import compose_calibration, load_calibration
    from quantbuild.config import CalibrationConfig, GgufConfig, SensitivityConfig
    from quantbuild.quantizers import model_layers
    from quantbuild.quantizers.gguf import _plan
    from quantbuild.sensitivity import WEIGHT_ERROR, measure

    base, _ = prepare(model, work)
    calibration_config = CalibrationConfig(sources={"workflow_prompts": 0.4, "tool_calls": 0.25, "long_context": 0.15,
                                                    "domain_text": 0.2}, samples=48, seq_len=512)
    compose_calibration(calibration_config, ROOT / "data" / "calibration", model, work / "calibration")
    calibration = load_calibration(work / "calibration")
    variant = GgufConfig(type="Q4_K_S", target_bpw=targets[0], mix_types=["Q2_K", "Q3_K", "IQ4_XS", "Q5_K", "Q6_K"])
    layers = model_layers(model)
    rows_out, raw, tables = [], {}, {}
    for stride in [1, *strides]:
        config = SensitivityConfig(measure=WEIGHT_ERROR, row_stride=stride, sample_rows_params=0)
        started = time.perf_counter()
        tables[stride] = measure(model, calibration, {"mix": variant}, config, base.parent)["mix"]
        seconds = time.perf_counter() - started
        plans = {target: {layer: entry["type"] for layer, entry in
                          _plan("bench", replace(variant, target_bpw=target), layers, tables[stride], model).items()}
                 for target in targets}
        whole = tables[1]
        values = [(entry["kld"][key][probes], tables[stride]["layers"][layer]["kld"][key][probes])
                  for layer, entry in whole["layers"].items() for key in entry["kld"] for probes in entry["kld"][key]]
        relative = sorted(abs(b / a - 1) for a, b in values if a > 0)
        every_row = raw[f"{model.name}/1"]["plans"] if stride > 1 else plans
        differing = {target: sum(plans[target][layer] != every_row[target][layer] for layer in layers)
                     for target in targets}
        sample = tables[stride].get("row_sample", {})
        rows_out.append([model.name, stride, f"{sample.get('rows', sum(out for out, _ in layers.values()))}",
                         f"{seconds:.1f}", f"{100 * statistics.median(relative):.2f}%", f"{100 * max(relative):.2f}%",
                         f"{spearman([a for a, _ in values], [b for _, b in values]):.4f}",
                         " ".join(f"{target}: {count}/{len(layers)}" for target, count in differing.items())])
        raw[f"{model.name}/{stride}"] = {"seconds": seconds, "plans": plans, "row_sample": sample,
                                         "median_relative": statistics.median(relative), "max_relative": max(relative)}
    return rows_out, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, nargs="+", default=[BASELINE])
    parser.add_argument("--strides", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--types", nargs="+", default=["Q4_K", "IQ4_XS", "Q3_K"])
    parser.add_argument("--pipeline", type=float, nargs="*", metavar="TARGET",
                        help="the sensitivity stage's measure sampled vs whole, and its plans at these targets")
    args = parser.parse_args()
    rows, raw = [], {}
    if args.pipeline is not None:
        for model in args.model:
            with tempfile.TemporaryDirectory(prefix="quantbuild-rows-") as work:
                found, measured = run_pipeline(model.resolve(), args.strides, args.pipeline or [3.5, 4.0, 4.5],
                                               Path(work))
                rows += found
                raw.update(measured)
        print(table(["model", "stride", "rows scored", "sensitivity (s)", "median change", "worst change",
                     "Spearman", "plan layers differing from every row's"], rows))
        save("row_sample_pipeline", raw)
        return
    for model in args.model:
        with tempfile.TemporaryDirectory(prefix="quantbuild-rows-") as work:
            found, measured = run_model(model.resolve(), args.strides, args.types, Path(work))
            rows += found
            raw.update(measured)
    print(table(["model", "type", "k", "rows kept", "full quantize (s)", "thumbnail (s)", "rows identical",
                 "median error of E", "worst error of E", "Spearman of E"], rows))
    save("row_sample", raw)


if __name__ == "__main__":
    main()
