"""Write the release bundle `<package dir>/<model>-<variant>/`: the model files, a model
card, `manifest.json` with the lineage, and nothing the manifest does not list."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from quantbuild.hashing import sha256_file, staged_dir, write_json
from quantbuild.manifest import MANIFEST, SCHEMA

CARD = "README.md"
LINEAGE_STAGES = ("fetch", "calibrate", "quantize@{v}", "evaluate@{v}", "evaluate_baseline", "select")


def git_state(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def dvc_lock_entries(lock_path: Path, variant: str) -> dict[str, Any]:
    """The dvc.lock entries of the stages that produced the bundle (empty if no lock yet)."""
    import yaml

    if not lock_path.is_file():
        return {}
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    wanted = [name.format(v=variant) for name in LINEAGE_STAGES]
    return {name: stages[name] for name in wanted if name in stages}


def model_card(manifest: dict[str, Any]) -> str:
    variant, baseline = manifest["variant"], manifest["evaluation"]["baseline"]
    measured = manifest["evaluation"]["variant"]
    rows = []
    for family in sorted(measured.get("families", {})):
        rows.append(f"| {family} | {baseline['families'][family]['score']:.3f} | {measured['families'][family]['score']:.3f} |")
    if "perplexity" in measured:
        rows.insert(0, f"| perplexity | {baseline['perplexity']:.4f} | {measured['perplexity']:.4f} |")
    return "\n".join([
        f"# {manifest['bundle']}",
        "",
        f"{variant['method'].upper()} {variant['parameters']['bits']}-bit "
        f"(group size {variant['parameters']['group_size']}) quantization of `{manifest['model']['name']}`, "
        f"{variant['bits_per_weight']} effective bits per weight, built by quantbuild and released by its gate.",
        "",
        "## Scores (baseline vs this artifact)",
        "",
        "| metric | baseline | this |",
        "|---|---|---|",
        *rows,
        "",
        f"KL divergence vs baseline: mean {measured.get('kld_mean', 0):.5f}, p99 {measured.get('kld_p99', 0):.5f}; "
        f"top-1 agreement {measured.get('top1_agreement', 1):.4f}.",
        "",
        "## Lineage",
        "",
        f"- baseline: {manifest['model']['source']} `{manifest['model']['location']}`"
        f" revision {manifest['model']['revision'] or 'n/a'}",
        f"- calibration digest: `{manifest['calibration']['digest']}`",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in sorted(variant['libraries'].items()))}",
        f"- git commit: {manifest['git']['commit']}",
        "",
        "## Load",
        "",
        "```python",
        "from gptqmodel import GPTQModel",
        f"model = GPTQModel.load('{manifest['bundle']}', device='cpu')  # or 'cuda'",
        "```",
        "",
        "## Verify",
        "",
        f"`quantbuild verify {manifest['bundle']}` re-hashes every file against `manifest.json` and compares",
        "this machine's runtime with the one the artifact was validated on (exit 0 ok, 1 integrity, 2 drift).",
        "",
    ])


def build_bundle(out: Path, bundle_name: str, model_dir: Path, lineage: dict[str, Any]) -> dict[str, Any]:
    """Copy the model into `out/<bundle_name>/` and write its card and manifest last."""
    with staged_dir(out) as staging:
        bundle = staging / bundle_name
        bundle.mkdir()
        for source in sorted(model_dir.iterdir()):
            if source.is_file():
                shutil.copyfile(source, bundle / source.name)
        manifest: dict[str, Any] = {"schema": SCHEMA, "bundle": bundle_name, **lineage}
        (bundle / CARD).write_text(model_card(manifest), encoding="utf-8")
        manifest["files"] = {
            path.name: {"sha256": sha256_file(path), "size": path.stat().st_size}
            for path in sorted(bundle.iterdir())
        }
        write_json(bundle / MANIFEST, manifest)
    return manifest
