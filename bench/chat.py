"""The bundled instruct model on llama.cpp (issue #25): how wrong the raw prompt measures a chat
model, and where degenerate output starts along the ladder.

    python bench/chat.py [--items 50] [--types F16 Q8_0 Q4_K_M Q3_K_S Q2_K IQ2_XXS IQ1_S]
                         [--raw F16 Q4_K_M Q3_K_S] [--model data/baseline/workflow-chat-33m]

Results: bench/out/chat_<model>.json.

The chat model's F16 GGUF (llama.cpp's converter) and its llama-quantize types (IQ types
with an importance matrix over the calibration mix rendered through the chat template),
each evaluated on the first `--items` items of every generative family:

- through the template the GGUF carries (as deployed), tool calls parsed in its `hermes`
  syntax: the family scores and the degenerate items (loop, no stop, script) per type;
- for the `--raw` types also on the raw prompts (`Request: ... Call:`, bare JSON), the way
  quantbuild measured every model before it knew chat templates.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchlib import ROOT, save, table

FAMILIES = ("structured", "retrieval", "long_context", "reasoning")
IMATRIX_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S")


def _files(model: Path, types: list[str], work: Path) -> dict[str, Path]:
    from quantbuild.config import CalibrationConfig
    from quantbuild.gguf_base import compute_imatrix
    from quantbuild.runtimes.gguf_file import convert
    from quantbuild.runtimes.llama_build import run_tool

    base = work / "F16.gguf"
    convert(model, base, "f16")
    matrix = None
    if any(name in IMATRIX_TYPES for name in types):
        matrix = work / "imatrix.gguf"
        calibration = CalibrationConfig(sources={"workflow_prompts": 0.4, "tool_calls": 0.25, "long_context": 0.15,
                                                 "domain_text": 0.2}, imatrix_samples=600, imatrix_chunk=512)
        compute_imatrix(base, calibration, ROOT / "data" / "calibration", model, False, matrix)
    files = {"F16": base}
    for name in types:
        if name != "F16":
            files[name] = work / f"{name}.gguf"
            extra = ["--imatrix", str(matrix)] if name in IMATRIX_TYPES else []
            run_tool("llama-quantize", [*extra, str(base), str(files[name]), name, "2"], f"quantize {name}")
    return {name: files[name] for name in types}


def _evaluate(path: Path, items: list, chat: bool) -> dict:
    from quantbuild.evaluation.suites import run_generative
    from quantbuild.prompts import PromptFormat, for_artifact
    from quantbuild.runtimes.protocol import LLAMA_CPP, LoadSpec, open_runtime

    spec = LoadSpec(LLAMA_CPP, path, threads=0, batch_size=32)
    fmt = for_artifact(spec) if chat else PromptFormat(None)
    with open_runtime(spec) as runtime:
        runtime.reserve(2048)
        records = run_generative(runtime, items, fmt)
    result = {}
    for family in FAMILIES:
        mine = [record for record, item in zip(records, items) if item.family == family]
        result[family] = sum(record["correct"] for record in mine) / len(mine)
    flagged = [record.get("degenerate", []) for record in records]
    result["degenerate"] = {"items": sum(bool(kinds) for kinds in flagged), "n": len(records),
                            **{kind: sum(kind in kinds for kinds in flagged) for kind in ("loop", "no_stop", "script")}}
    result["malformed_wrapper"] = sum(record.get("failure") == "malformed_wrapper" for record in records)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_K_M", "Q3_K_S", "Q2_K", "IQ2_XXS", "IQ1_S"])
    parser.add_argument("--raw", nargs="*", default=["F16", "Q4_K_M", "Q3_K_S"])
    parser.add_argument("--model", type=Path, default=ROOT / "data" / "baseline" / "workflow-chat-33m")
    args = parser.parse_args()

    from quantbuild.runtimes.gguf_file import layout
    from quantbuild.tasks.items import load_items

    def file_bits_per_weight(path: Path) -> float:
        tensors = layout(path).tensors
        return sum(tensor.nbytes for tensor in tensors) * 8 / sum(tensor.elements for tensor in tensors)

    items = [item for family in FAMILIES for item in load_items(ROOT / "data" / "eval" / f"{family}.jsonl")[: args.items]]
    results: dict = {"items_per_family": args.items, "types": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name, path in _files(args.model, args.types, Path(folder)).items():
            entry = {"bits_per_weight": round(file_bits_per_weight(path), 3), "templated": _evaluate(path, items, True)}
            if name in args.raw:
                entry["raw"] = _evaluate(path, items, False)
            results["types"][name] = entry
            print(name, entry, flush=True)
    save(f"chat_{args.model.name}", results)
    rows = [[name, family, f"{entry['raw'][family]:.3f}", f"{entry['templated'][family]:.3f}"]
            for name, entry in results["types"].items() if "raw" in entry for family in FAMILIES]
    print(f"\nFamily scores of {args.model.name}, raw prompt vs its chat template ({args.items} items per family):\n")
    print(table(["type", "family", "raw prompt", "chat template"], rows))
    rows = []
    for name, entry in results["types"].items():
        measured = entry["templated"]
        degenerate = measured["degenerate"]
        rows.append([name, entry["bits_per_weight"], *(f"{measured[family]:.3f}" for family in FAMILIES),
                     f"{degenerate['items']}/{degenerate['n']}", degenerate["loop"], degenerate["no_stop"],
                     degenerate["script"], measured["malformed_wrapper"]])
    print("\nDegenerate outputs along the ladder, through the chat template:\n")
    print(table(["type", "bits/weight", *FAMILIES, "degenerate", "loop", "no stop", "script", "malformed wrapper"],
                rows))


if __name__ == "__main__":
    main()
