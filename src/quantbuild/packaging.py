"""Write the release bundle `<package dir>/<model>-<variant>/`: the model files, a model
card, `provenance.intoto.json`, `manifest.json` with the lineage, and, where a signing key
is configured, `model.sig` over all of them; nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from quantbuild.hashing import sha256_file, staged_dir, write_json
from quantbuild.manifest import MANIFEST, SCHEMA
from quantbuild.provenance import PROVENANCE, statement

CARD = "README.md"
LINEAGE_STAGES = ("fetch", "calibrate", "quantize@{v}", "evaluate@{v}", "evaluate_baseline", "select")


def git_state(repo: Path) -> dict[str, Any]:
    from quantbuild.registry import git

    commit = git(repo, "rev-parse", "HEAD", check=False)
    return {"commit": commit or None, "dirty": bool(git(repo, "status", "--porcelain", "--untracked-files=no", check=False))}


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
        *LOAD_SNIPPETS.get(variant["method"], LOAD_SNIPPETS["gptq"]),
        f"model = load('{manifest['bundle']}')",
        "```",
        "",
        "## Verify",
        "",
        f"`quantbuild verify {manifest['bundle']}` re-hashes every file against `manifest.json`, checks the",
        "signature (`--public-key`) where the bundle is signed, and compares this machine's runtime with the",
        "one the artifact was validated on (exit 0 ok, 1 integrity, 2 drift). `provenance.intoto.json` is",
        "an in-toto statement with SLSA provenance; `quantbuild lineage` prints the whole chain.",
        "",
    ])


_GPTQMODEL_LOAD = ["from gptqmodel import GPTQModel", "def load(path): return GPTQModel.load(path, device='cpu')  # or 'cuda'"]
LOAD_SNIPPETS = {
    "gptq": _GPTQMODEL_LOAD, "rtn": _GPTQMODEL_LOAD, "mixed": _GPTQMODEL_LOAD, "awq": _GPTQMODEL_LOAD,
    "bnb": ["from transformers import AutoModelForCausalLM  # needs bitsandbytes",
            "def load(path): return AutoModelForCausalLM.from_pretrained(path, device_map='cpu')  # or 'cuda'"],
}


def build_bundle(out: Path, bundle_name: str, model_dir: Path, lineage: dict[str, Any],
                 signing_key: Path | None = None) -> dict[str, Any]:
    """Copy the model into `out/<bundle_name>/`, write its card and provenance, then the
    manifest, then (with `signing_key`) the signature over all of them."""
    from quantbuild.signing import sign_bundle, signing_record

    signing = signing_record(signing_key) if signing_key is not None else None
    with staged_dir(out) as staging:
        bundle = staging / bundle_name
        bundle.mkdir()
        for source in sorted(model_dir.iterdir()):
            if source.is_file():
                shutil.copyfile(source, bundle / source.name)
        manifest: dict[str, Any] = {"schema": SCHEMA, "bundle": bundle_name, **lineage}
        (bundle / CARD).write_text(model_card(manifest), encoding="utf-8")
        subjects = {path.name: sha256_file(path) for path in sorted(bundle.iterdir())}
        write_json(bundle / PROVENANCE, statement(subjects, lineage))
        manifest["files"] = {
            path.name: {"sha256": sha256_file(path), "size": path.stat().st_size}
            for path in sorted(bundle.iterdir())
        }
        if signing is not None:
            manifest["signing"] = signing
        write_json(bundle / MANIFEST, manifest)
        if signing_key is not None:
            sign_bundle(bundle, signing_key)
    return manifest
