"""The release summary printed at the end of `make demo` (and by `quantbuild summary`)."""

from __future__ import annotations

import json
from pathlib import Path

from quantbuild.config import Config
from quantbuild.errors import DataError
from quantbuild.manifest import MANIFEST


def release_summary(config: Config) -> str:
    decision_path = Path(config.paths.release) / "decision.json"
    if not decision_path.is_file():
        raise DataError(f"{decision_path}: no release decision yet (run `dvc repro`)")
    decision = json.loads(decision_path.read_text())
    lines = ["release summary", "==============="]
    for name in decision["order_most_compressed_first"]:
        entry = decision["variants"][name]
        failed = [check["budget"] for check in entry["checks"] if not check["pass"]]
        verdict = "pass" if entry["pass"] else "FAIL (" + ", ".join(failed) + ")"
        lines.append(f"  {name:<20} {entry['size_bytes'] / 1e6:7.2f} MB  {entry['bits_per_weight']:6.3f} bits/weight  {verdict}")
    chosen = decision["chosen"]
    if chosen is None:
        lines.append("no variant passed the gate: nothing was packaged")
        return "\n".join(lines)
    bundle = Path(config.paths.package) / f"{config.model.name}-{chosen}"
    manifest = json.loads((bundle / MANIFEST).read_text())
    baseline, measured = manifest["evaluation"]["baseline"], manifest["evaluation"]["variant"]
    lines.append(f"chosen: {chosen} ({manifest['variant']['method']}, {manifest['variant']['bits_per_weight']} bits/weight)")
    lines.append(f"  perplexity {baseline.get('perplexity', 0):.4f} -> {measured.get('perplexity', 0):.4f}; "
                 f"KLD mean {measured.get('kld_mean', 0):.5f}, p99 {measured.get('kld_p99', 0):.5f}; "
                 f"top-1 agreement {measured.get('top1_agreement', 1):.4f}")
    for family in sorted(measured["families"]):
        b, v = baseline["families"][family], measured["families"][family]
        lines.append(f"  {family:<14} {b['score']:.3f} -> {v['score']:.3f}  (n={v['n']}, 95% CI {v['ci_low']:.3f}-{v['ci_high']:.3f})")
    size = sum(entry["size"] for entry in manifest["files"].values())
    lines.append(f"package: {bundle} ({size / 1e6:.2f} MB); check it with `quantbuild verify {bundle}`")
    return "\n".join(lines)
