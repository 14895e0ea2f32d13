"""What each pipeline stage costs as the model grows: `dvc repro` of the default ladder on
each bundled model, in a fresh clone from empty artifacts, one after the other on this
machine; each stage's seconds as the stage printed them, and the ratio to the first model.

    python bench/stage_cost.py [--models workflow-llama-8m workflow-chat-33m] [--keep DIR]

The models' decoder sizes are read off their config.json; the ratio column says how each
stage's time grew against the parameters' ratio (a stage that grows with the parameters
has about that ratio; one bound by a fixed count of tokens or files, less). The evaluate
stages are also summed, as the share of the whole run they take.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, save, stage_times, table

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}


def parameters(model: str) -> int:
    """Parameters of a bundled Llama from its config.json (embeddings and output included)."""
    config = json.loads((ROOT / "data" / "baseline" / model / "config.json").read_text())
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head = config.get("head_dim") or hidden // heads
    attention = hidden * head * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * config["intermediate_size"]
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp) + embeddings


def repro(model: str, work: Path) -> tuple[dict[str, float], float]:
    """(each stage's seconds, the whole `dvc repro`'s wall seconds) of the default ladder on `model`."""
    repo = work / model
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    subprocess.run([str(BIN / "quantbuild"), "compose", "--reset", f"model={model}"], cwd=repo, env=ENV, check=True,
                   capture_output=True)
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (work / f"{model}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{model}: dvc repro failed (exit {done.returncode}); its log: {work / f'{model}.log'}")
    return stage_times(done.stdout + done.stderr), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["workflow-llama-8m", "workflow-chat-33m"])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep the clones and logs")
    parser.add_argument("--from-logs", type=Path, help="tabulate the logs a --keep run left in this folder")
    args = parser.parse_args()
    if args.from_logs:
        measured = {model: (stage_times((args.from_logs / f"{model}.log").read_text()), None) for model in args.models}
        report(args.models, measured)
        return
    scratch = None if args.keep else tempfile.TemporaryDirectory(prefix="quantbuild-cost-")
    work = args.keep or Path(scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    measured = {}
    for model in args.models:
        measured[model] = repro(model, work)
        print(f"{model}: dvc repro {measured[model][1]:.0f} s", flush=True)
    report(args.models, measured)
    if scratch is not None:
        scratch.cleanup()


def report(models: list[str], measured: dict[str, tuple[dict[str, float], float | None]]) -> None:
    """The table: each stage's seconds per model and its ratio to the first model's."""
    first = models[0]
    sizes = {model: parameters(model) for model in models}
    names = list(dict.fromkeys(name for model in models for name in measured[model][0]))
    rows = []
    for name in names:
        cells = [measured[model][0].get(name) for model in models]
        ratios = [f"{cell / cells[0]:.1f}x" if cell and cells[0] else "-" for cell in cells[1:]]
        rows.append([name, *[f"{cell:.1f}" if cell is not None else "-" for cell in cells], *ratios])
    for label, keep in (("evaluate stages, summed", lambda name: name.startswith("evaluate")),
                        ("every stage, summed", lambda name: True)):
        sums = [sum(seconds for name, seconds in measured[model][0].items() if keep(name)) for model in models]
        rows.append([label, *[f"{value:.1f}" for value in sums], *[f"{value / sums[0]:.1f}x" for value in sums[1:]]])
    rows.append(["parameters (M)", *[f"{sizes[model] / 1e6:.1f}" for model in models],
                 *[f"{sizes[model] / sizes[first]:.1f}x" for model in models[1:]]])
    print(table(["stage", *[f"{model} (s)" for model in models], *[f"{model} / {first}" for model in models[1:]]],
                rows))
    save("stage_cost", {model: {"stages": measured[model][0], "wall_s": measured[model][1],
                                "parameters": sizes[model]} for model in models})


if __name__ == "__main__":
    main()
