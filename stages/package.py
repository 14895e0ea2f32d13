"""Stage package: bundle each variant the gate released (one per deploy target; a variant
released for several targets is one bundle), with its manifest and model card, then verify
every bundle it just wrote.

    python -m stages.package

A bundle holds, per target it was released for, that target's validation record (the
evaluation, the gate's verdict, the fingerprint) in its manifest's `targets` and its
behavioural probes under `targets/<target>/`: the same bytes validated on two targets are
one artifact with two records, not two copies.
"""

from dataclasses import asdict
from pathlib import Path

from quantbuild.behaviour import BEHAVIOUR, PROBES
from quantbuild.calibration import RECORD as CALIBRATION_RECORD
from quantbuild.config import Config
from quantbuild.errors import IntegrityError
from quantbuild.evaluation.runner import MEASUREMENTS
from quantbuild.fingerprint import scopes_of
from quantbuild.gate import released, require_release
from quantbuild.gguf_artifacts import RECORD as GGUF_BASE_RECORD, imatrix_record
from quantbuild.hashing import read_json, staged_dir
from quantbuild.quantization import MODEL_DIR, RECORD, require_recorded_bytes
from quantbuild.repair import locate, repaired_variants
from quantbuild.release.packaging import TARGETS, dvc_lock_entries, git_state, write_bundle
from quantbuild.release.verify import verify
from quantbuild.runtimes import TARGET_RUNTIME, target_of
from quantbuild.sources import RECORD as FETCH_RECORD
from quantbuild.stage import run_stage, say


def lineage_of(config: Config, decision: dict, chosen: str, targets: list[str]) -> tuple[dict, dict[str, Path]]:
    """The manifest's lineage of the released variant `chosen` and its probe files, for the
    deploy `targets` it was released for (the first is the bundle's primary record)."""
    paths = config.paths
    quantized, _ = locate(paths, chosen, targets[0])
    parent = repaired_variants(decision.get("repair")).get(chosen)
    record = read_json(quantized / RECORD)
    require_recorded_bytes(quantized / MODEL_DIR, record)
    calibration = read_json(Path(paths.calibration) / CALIBRATION_RECORD)
    build_scope, runtime_scope = scopes_of(record["method"])
    validated, probes = {}, {}
    for target in targets:
        evaluated = locate(paths, chosen, target)[1]
        behaviour = read_json(evaluated / BEHAVIOUR)
        gate = decision.get("targets", {}).get(target, decision)
        validated[target] = {
            "evaluation": {"baseline": read_json(locate(paths, "baseline", target)[1] / MEASUREMENTS),
                           "variant": read_json(evaluated / MEASUREMENTS)},
            "gate": {"chosen": chosen, **gate["variants"][chosen]},
            "fingerprint": read_json(Path(paths.fingerprint) / "targets" / f"{target}.json"),
            # the behavioural probes as the variant answered them on this target
            "behaviour": {key: behaviour[key] for key in ("runtime", "probes_sha256", "probe_tokens_sha256",
                                                          "tolerance", "spread")},
            "probes": f"{TARGETS}/{target}",
        }
        for name in (BEHAVIOUR, PROBES):
            probes[f"{TARGETS}/{target}/{name}"] = evaluated / name
    primary = validated[targets[0]]
    target = target_of(record["method"], record.get("target"))
    lineage = {
        "model": read_json(Path(paths.baseline) / FETCH_RECORD),
        "variant": {key: record[key] for key in ("variant", "method", "parameters", "libraries", "bits_per_weight",
                                                 "size_bytes", "layers", "files")},
        # A repair build: the ladder variant it repairs and every round of the closed loop.
        "repair": {"repairs": parent, **decision["repair"]["variants"][parent]} if parent else None,
        "calibration": {key: calibration[key] for key in ("digest", "samples", "tokens", "seq_len", "seed",
                                                          "composition")},
        "params": asdict(config),
        "fingerprints": {"build": read_json(Path(paths.fingerprint) / f"{build_scope}.json"),
                         "runtime": read_json(Path(paths.fingerprint) / f"{runtime_scope}.json"),
                         "runtime_scope": runtime_scope},
        "deploy_runtime": TARGET_RUNTIME[target],
        "target": target,
        # the deploy targets it was released for, each with its own validation record
        "validated_for": targets,
        "targets": validated,
        "evaluation": primary["evaluation"],
        "gate": primary["gate"],
        "behaviour": primary["behaviour"],
        "git": git_state(Path.cwd()),
        "dvc_lock": dvc_lock_entries(Path("dvc.lock"), parent or chosen, targets),
    }
    if record["method"] == "gguf":
        base = read_json(Path(paths.gguf_base) / GGUF_BASE_RECORD)
        lineage["imatrix"] = imatrix_record(Path(paths.imatrix)) if record["parameters"].get("imatrix") else None
        lineage["base_gguf"] = {key: base[key] for key in ("base_type", "base_sha256", "tensors_sha256", "pre_tokenizer")}
    return lineage, probes


def main(config: Config) -> None:
    paths = config.paths
    decision = read_json(Path(paths.release) / "decision.json")
    require_release(decision)
    bundles: dict[str, list[str]] = {}
    for target, chosen in released(decision).items():
        bundles.setdefault(chosen, []).append(target)
    signing_key = Path(config.package.signing_key) if config.package.signing_key else None
    public_key = Path(config.package.public_key) if config.package.public_key else None
    written = {}
    with staged_dir(Path(paths.package)) as staging:
        for chosen, targets in bundles.items():
            lineage, probes = lineage_of(config, decision, chosen, targets)
            name = f"{config.model.name}-{chosen}"
            quantized = locate(paths, chosen, targets[0])[0]
            write_bundle(staging / name, quantized / MODEL_DIR, lineage, signing_key, probes)
            written[name] = (lineage, targets)
    for name, (lineage, targets) in written.items():
        result = verify(Path(paths.package) / name, lineage["fingerprints"]["runtime"],
                        public_key if signing_key else None, target=targets[0])
        if result.problems:
            raise IntegrityError(f"the bundle just written does not verify: {result.problems}")
        signed = f", signed ({signing_key})" if signing_key else ""
        say(f"packaged {Path(paths.package) / name} for {', '.join(targets)}{signed}")


if __name__ == "__main__":
    run_stage(main)
