"""The GPU ladder end to end (issue #16): `dvc repro` of `quant=cuda eval=gpu` on a ~1B Llama.

    python bench/gpu_ladder.py prepare [--model random-1b]   # the model, its pin, params.yaml
    dvc repro                                                 # the real pipeline, every stage
    python bench/gpu_ladder.py report                         # the table below

`prepare` writes a random-initialised Llama (seeded; `bench/quantize.py`'s `random-1b`:
16 layers, hidden 2048, MLP 8192, the bundled tokenizer), pins every file's sha256 in
`conf/model/<model>.yaml` (`quantbuild pin`), and composes params.yaml for the GPU ladder
(GPTQ and AWQ on GPTQModel's Triton kernels, bitsandbytes NF4 and LLM.int8 on CUDA; every
suite on the GPU). `report` reads what the pipeline wrote and sets each variant's decode
rate against the memory-bandwidth bound (weight bytes read once per token), with the
bandwidth measured here in the same run (a device-to-device copy).
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchlib import OUT, ROOT, save, table


def pin_random_model(model: str, written_by: str) -> None:
    """`conf/model/<model>.yaml`: the random-initialised Llama `model` (bench/quantize.py's
    RANDOM_MODELS, made once), every file pinned by `quantbuild pin`."""
    from quantize import model_folder

    folder = model_folder(model)
    pin = subprocess.run([sys.executable, "-c", "from quantbuild.cli import main; main()", "pin",
                          str(folder.relative_to(ROOT)), "--name", model],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    (ROOT / "conf" / "model" / f"{model}.yaml").write_text(f"# Written by {written_by}: a random-initialised Llama.\n"
                                                          + pin)


def prepare(model: str, limit: int, repeats: int) -> None:
    pin_random_model(model, "bench/gpu_ladder.py prepare, for the GPU ladder")
    # Random weights answer no item right, baseline and variants alike: the family budgets
    # would judge noise, so they are 1 (any drop); the gate keeps its distribution, latency
    # and memory checks.
    overrides = [f"model={model}", "quant=cuda", "eval=gpu", f"eval.limit={limit}",
                 f"eval.latency.repeats={repeats}", "gate.must_not_degrade=[]",
                 *(f"gate.max_family_drop.{family}=1.0" for family in ("retrieval", "long_context", "reasoning"))]
    subprocess.run([sys.executable, "-c", "from quantbuild.cli import main; main()", "compose", "--reset", *overrides],
                   cwd=ROOT, check=True)
    print("composed params.yaml:", " ".join(overrides))


def bandwidth_gb_s(gigabytes: float = 4.0, repeats: int = 10) -> float:
    """Device memory bandwidth, bytes read plus written per second, median of `repeats` copies."""
    import statistics

    import torch

    source = torch.empty(int(gigabytes * 2**30) // 2, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * source.numel() / statistics.median(times[1:]) / 1e9


def report() -> None:
    import torch
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    evals, quantized = ROOT / params["paths"]["eval"], ROOT / params["paths"]["quantized"]
    decision = json.loads((ROOT / params["paths"]["release"] / "decision.json").read_text())
    verdicts = decision["variants"]
    # (without a GPU the table still reads, with no bound: for checking a CPU run of the ladder)
    bandwidth = bandwidth_gb_s() if torch.cuda.is_available() else float("nan")
    rows, raw = [], {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
                     "bandwidth_gb_s": round(bandwidth, 1),
                     "torch": torch.__version__, "variants": {}}
    first = str(min(params["eval"]["latency"]["prompt_lengths"]))
    for name in ["baseline", *params["quant"]["variants"]]:
        measured = json.loads((evals / name / "measurements.json").read_text())
        record = {} if name == "baseline" else json.loads((quantized / name / "quantize_record.json").read_text())
        memory = measured["memory"]["by_context"]
        weights_mb = memory[min(memory, key=int)]["weights_mb"]
        decode = measured["latency"][first]["decode_tokens_per_s_p50"]
        bound = bandwidth * 1e9 / (weights_mb * 2**20)
        paired = measured.get("latency_vs_baseline", {}).get("worst", {})
        verdict = verdicts.get(name, {})
        raw["variants"][name] = {"measured": measured.get("torch"), "record": record, "decode": decode,
                                 "bound": bound, "verdict": verdict}
        failed = [check["budget"] for check in verdict.get("checks", []) if not check["pass"]]
        rows.append([name, record.get("bits_per_weight", 16), record.get("wall_seconds", ""),
                     record.get("peak_gpu_mb", ""), ", ".join(measured.get("torch", {}).get("kernels", [])) or "dense",
                     round(weights_mb, 1), measured.get("kld_mean", 0), decode, f"{bound:.0f}", f"{decode / bound:.3f}",
                     measured["latency"][first]["ttft_ms_p50"], memory[max(memory, key=int)]["peak_mb"],
                     paired.get("ratio", ""), "" if not verdict else "pass" if verdict["pass"] else
                     "fails " + ", ".join(failed)])
    save("gpu_ladder", {**raw, "decision": {"chosen": decision.get("chosen")}})
    print(f"{raw['gpu']}, torch {raw['torch']}; measured bandwidth {bandwidth:.0f} GB/s (copy, read + write)")
    print(table(["variant", "bits/weight", "quantize s", "quantize peak GPU MB", "kernel", "weights MB", "KLD",
                 f"decode tok/s @{first}", "bound tok/s", "of bound", f"TTFT ms @{first}", "peak MB",
                 "paired latency", "gate"], rows))
    print("released:", decision.get("chosen"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_prepare = sub.add_parser("prepare")
    run_prepare.add_argument("--model", default="random-1b")
    run_prepare.add_argument("--limit", type=int, default=64, help="eval items per family")
    run_prepare.add_argument("--repeats", type=int, default=5, help="latency runs per prompt length")
    sub.add_parser("report")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.command == "prepare":
        prepare(args.model, args.limit, args.repeats)
    else:
        report()


if __name__ == "__main__":
    main()
