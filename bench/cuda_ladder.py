"""The GGUF ladder on llama.cpp's CUDA target beside its CPU target (issue #26); run by
bench/cuda_ladder.sh on a CUDA machine.

    python bench/cuda_ladder.py prepare --model random-1b    # a random Llama, its pin, conf/model/
    python bench/cuda_ladder.py speed [--cpu]                # llama-bench per built type, against F16
    python bench/cuda_ladder.py stages LOG                   # each stage's time in a `dvc repro` log

`speed` runs llama.cpp's own llama-bench (`-fa 1 -p 512 -n 128 -r 5`) on the baseline's F16
GGUF and every variant the pipeline built (artifacts/quantized/*/model/model.gguf), with
every layer on the GPU (`-ngl 99`) and, with --cpu, on the CPU (`-ngl 0`, every core), and
sets each GPU decode rate against the memory-bandwidth bound: the file's bytes read once per
token at the bandwidth measured in the same run (a device-to-device copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from benchlib import ROOT, save, stage_times, table


def prepare(model: str) -> None:
    from gpu_ladder import pin_random_model
    from quantize import RANDOM_MODELS

    RANDOM_MODELS.setdefault("random-8b", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                num_attention_heads=32, num_key_value_heads=8))
    pin_random_model(model, "bench/cuda_ladder.py prepare, for the CUDA ladder")
    print(f"conf/model/{model}.yaml written")


def llama_bench(files: list[Path], gpu: bool) -> dict[str, dict]:
    from quantbuild.runtimes.llama_build import tool

    command = [str(tool("llama-bench")), "-fa", "1", "-p", "512", "-n", "128", "-r", "5", "-o", "json",
               "-ngl", "99" if gpu else "0"]
    for file in files:
        command += ["-m", str(file)]
    rows = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    results: dict[str, dict] = {}
    for row in rows:
        kind = "decode" if row["n_gen"] else "prefill"
        results.setdefault(row["model_filename"], {})[f"{kind}_tok_s"] = row["avg_ts"]
    return results


def speed(cpu: bool) -> None:
    from quantbuild.runtimes.gguf_file import layout

    base = ROOT / "artifacts" / "gguf" / "base.gguf"
    files = {"F16 (baseline)": base}
    for model in sorted((ROOT / "artifacts" / "quantized").glob("*/model/model.gguf")):
        files[model.parent.parent.name] = model
    from gpu_ladder import bandwidth_gb_s

    gpu = llama_bench(list(files.values()), gpu=True)
    bandwidth = bandwidth_gb_s()
    host = llama_bench(list(files.values()), gpu=False) if cpu else {}
    reference = gpu[str(base)]["decode_tok_s"]
    reference_cpu = host.get(str(base), {}).get("decode_tok_s")
    rows, raw = [], {"bandwidth_gb_s": bandwidth, "files": {}}
    for name, path in files.items():
        size = path.stat().st_size
        measured = gpu[str(path)]
        bound = bandwidth * 1e9 / size
        row = [name, f"{size / 2**20:.0f}", f"{measured['decode_tok_s']:.0f}",
               f"{measured['decode_tok_s'] / reference:.2f}", f"{100 * measured['decode_tok_s'] / bound:.0f}%",
               f"{measured['prefill_tok_s']:.0f}"]
        if host:
            row += [f"{host[str(path)]['decode_tok_s']:.1f}", f"{host[str(path)]['decode_tok_s'] / reference_cpu:.2f}"]
        rows.append(row)
        raw["files"][name] = {"bytes": size, "cuda": measured, "cpu": host.get(str(path)), "type": _type(layout, path)}
    headers = ["variant", "MiB", "CUDA decode tok/s", "x F16", "% of bandwidth bound", "CUDA prefill tok/s"]
    if host:
        headers += ["CPU decode tok/s", "x F16 (CPU)"]
    print(f"llama-bench -fa 1 -p 512 -n 128 -r 5; bandwidth {bandwidth:.0f} GB/s (device-to-device copy, same run)")
    print(table(headers, rows))
    save("cuda_ladder_speed", raw)


def _type(layout, path: Path) -> str:
    values = layout(path).values
    return str(values.get("general.file_type", "?"))


def stages(log: Path) -> None:
    """Each stage's time as the stage itself printed it (`... [12.3 s]`) in a `dvc repro` log."""
    times = stage_times(log.read_text(errors="replace"))
    rows = [[name, f"{seconds:.1f}"] for name, seconds in times.items()]
    print(table(["stage", "seconds"], rows))
    print(f"total {sum(times.values()):.0f} s; median stage {statistics.median(times.values()) if times else 0:.1f} s")
    save("cuda_ladder_stages", times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare").add_argument("--model", default="random-1b")
    commands.add_parser("speed").add_argument("--cpu", action="store_true")
    commands.add_parser("stages").add_argument("log", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.model)
    elif args.command == "speed":
        speed(args.cpu)
    else:
        stages(args.log)


if __name__ == "__main__":
    main()
