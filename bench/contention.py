"""A stage's llama.cpp work beside a job that holds cores: on the free cores against on every core.

    python bench/contention.py [--stage gguf_mix_3p5] [--busy 1] [--repeats 1]

Runs `python -m stages.quantize STAGE` (by default the planned mix, whose validation loads
llama.cpp a dozen times) with `--busy` spinning processes beside it, alternately as it is
(`free`: llama.cpp on the cores free when the validation starts, `llama_build.free_cores`)
and with the thread count put back to every core (`all`: `llama_build.cores()`, what the
validation used before), and prints each run's seconds and the file's sha256 (the same in
both: the thread count does not change a byte). It rewrites the stage's output folder; the
last run leaves it as `dvc repro` would (the same file; the record's wall time differs).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time

from benchlib import ROOT, save, table

# Run in the child: the stage, with the thread count forced to every core for `all`.
CHILD = """
import runpy, sys
sys.path.insert(0, {root!r})
import quantbuild.runtimes.llama_build as llama_build
if {every_core!r}:
    llama_build.free_cores = lambda: {{"threads": llama_build.cores()}}
sys.argv = ["stages.quantize", {stage!r}]
runpy.run_module("stages.quantize", run_name="__main__")
"""


def run(stage: str, every_core: bool) -> tuple[float, str]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), every_core=every_core, stage=stage)],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    model = ROOT / "artifacts" / "quantized" / stage / "model" / "model.gguf"
    return seconds, hashlib.sha256(model.read_bytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="gguf_mix_3p5")
    parser.add_argument("--busy", type=int, default=1, help="spinning processes beside the stage")
    parser.add_argument("--repeats", type=int, default=1, help="runs on every core (each followed by one on free cores)")
    args = parser.parse_args()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    rows, raw = [], []
    try:
        time.sleep(2)
        # interleaved, starting and ending on free cores (the last run leaves the output)
        for mode in ["free"] + ["all", "free"] * args.repeats:
            seconds, digest = run(args.stage, every_core=mode == "all")
            raw.append({"mode": mode, "seconds": round(seconds, 1), "sha256": digest})
            rows.append([mode, f"{seconds:.1f}", digest])
    finally:
        for spinner in spinners:
            spinner.kill()
    free = sorted(entry["seconds"] for entry in raw if entry["mode"] == "free")
    every = sorted(entry["seconds"] for entry in raw if entry["mode"] == "all")
    print(f"stages.quantize {args.stage} beside {args.busy} busy core(s)")
    print(table(["threads", "seconds", "model.gguf sha256"], rows))
    print(f"median: free cores {free[len(free) // 2]:.1f} s, every core {every[len(every) // 2]:.1f} s "
          f"({every[len(every) // 2] / free[len(free) // 2]:.2f}x)")
    save("contention", {"stage": args.stage, "busy": args.busy, "runs": raw})


if __name__ == "__main__":
    main()
