"""Behavioural fingerprint: the spread the tolerances are set from, and what they catch
(numbers for the closing note and bench/README.md).

    python bench/behaviour.py [--repeats 5]

Needs the default pipeline's artifacts (`make demo`). For the released GGUF, the probes as
the evaluate stage recorded them are rerun on this machine at 1 and 2 threads, `--repeats`
times each (the spread), then under changes that leave every version string the same: the
KV cache in q8_0 / q4_0, and another variant's weights under the same name. On the torch
runtime (the bundled baseline, float32), the same for a bfloat16 GEMM in every decoder
layer, and a bfloat16 rounding of one layer's input. Each row: the measures and which
tolerance they trip.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchlib import ROOT, save, table




def _row(label: str, outcome: dict) -> list:
    measured = outcome["measured"]
    tripped = ", ".join(measure for measure, _, _ in outcome["drift"]) or "none (passes)"
    return [label, f"{measured['kld_mean']:.2e}", f"{measured['kld_max']:.2e}", f"{measured['top1_agreement']:.3f}",
            f"{measured['greedy_match']:.3f}", tripped]


def check_gguf(model: Path, kv: str, probes: Path, threads: int | None = None) -> dict:
    """The probes rerun on the GGUF file `model` in llama.cpp with the KV cache in `kv`."""
    from quantbuild import behaviour
    from quantbuild.runtimes.llama_cpp import LlamaCppModel

    with LlamaCppModel(model, n_ctx=256, kv_type=kv) as runtime:
        return behaviour.check(runtime, probes, threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantbuild import behaviour
    from quantbuild.validation import load_config
    from quantbuild.hashing import read_json
    from quantbuild.runtimes.torch_stack import TorchRuntime

    config = load_config(ROOT / "params.yaml")
    decision = read_json(ROOT / config.paths.release / "decision.json")
    chosen = decision["chosen"]
    probes = ROOT / config.paths.eval / chosen
    model = ROOT / config.paths.quantized / chosen / "model" / "model.gguf"
    if not (probes / behaviour.BEHAVIOUR).is_file():
        sys.exit("run `make demo` first: no recorded probes")
    info = read_json(probes / behaviour.BEHAVIOUR)
    rows, results = [], {"tolerance": info["tolerance"], "rows": []}
    kv = info["kv_cache_type"]

    def add(label: str, outcome: dict) -> None:
        rows.append(_row(label, outcome))
        results["rows"].append({"label": label, **outcome})
        print(rows[-1], flush=True)

    for threads in (1, 2):
        for repeat in range(args.repeats):
            add(f"{chosen}, unchanged, {threads} thread(s), run {repeat + 1}",
                check_gguf(model, kv, probes, threads))
    for other_kv in ("q8_0", "q4_0"):
        add(f"{chosen}, KV cache {other_kv} instead of {kv}",
            check_gguf(model, other_kv, probes))
    for other in sorted(decision["variants"]):
        if other != chosen and decision["variants"][other]["bits_per_weight"] < 16:
            weights = ROOT / config.paths.quantized / other / "model" / "model.gguf"
            add(f"{other}'s weights under {chosen}'s name", check_gguf(weights, kv, probes))
    baseline = ROOT / config.paths.baseline
    tokenizer = AutoTokenizer.from_pretrained(str(baseline))
    dense = AutoModelForCausalLM.from_pretrained(str(baseline), dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as folder:
        torch_probes = Path(folder)
        runtime = TorchRuntime(dense, tokenizer)
        behaviour.record(runtime, torch_probes)
        for threads in (1, 2):
            add(f"torch baseline, unchanged, {threads} thread(s)",
                behaviour.check(runtime, torch_probes, threads=threads))
        layers = {name: module for name, module in dense.named_modules()
                  if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"}
        first = dense.model.layers[0].mlp.down_proj
        first.forward = lambda x, f=first.forward: f(x.to(torch.bfloat16).to(torch.float32))
        add("torch baseline, bf16 rounding of one layer's input",
            behaviour.check(runtime, torch_probes))
        del first.forward
        for module in layers.values():
            module.forward = (lambda m: lambda x: F.linear(x.to(torch.bfloat16),
                                                           m.weight.to(torch.bfloat16)).to(torch.float32))(module)
        add("torch baseline, bf16 GEMM in every decoder layer",
            behaviour.check(runtime, torch_probes))
    print(f"\nprobes: {len(info['probes'])}, tolerance {info['tolerance']}, spread recorded at evaluate "
          f"{info['spread']}")
    print(table(["run", "KLD mean", "KLD p99", "top-1", "greedy match", "tolerance tripped"], rows))
    save("behaviour", results)


if __name__ == "__main__":
    main()
