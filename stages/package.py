"""Stage package: bundle the variant the gate chose, with its manifest and model card,
then verify the bundle it just wrote.

    python -m stages.package
"""

from dataclasses import asdict
from pathlib import Path

from quantbuild.behaviour import BEHAVIOUR, PROBES
from quantbuild.calibration import RECORD as CALIBRATION_RECORD
from quantbuild.config import Config
from quantbuild.errors import IntegrityError
from quantbuild.evaluation.runner import MEASUREMENTS
from quantbuild.fingerprint import scopes_of
from quantbuild.gate import require_release
from quantbuild.gguf_base import RECORD as GGUF_BASE_RECORD
from quantbuild.hashing import read_json
from quantbuild.quantization import MODEL_DIR, RECORD
from quantbuild.repair import locate, repaired_variants
from quantbuild.release.packaging import build_bundle, dvc_lock_entries, git_state, require_recorded_bytes
from quantbuild.release.verify import verify
from quantbuild.runtimes import TARGET_RUNTIME, target_of
from quantbuild.sources import RECORD as FETCH_RECORD
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    paths = config.paths

    decision = read_json(Path(paths.release) / "decision.json")
    chosen = require_release(decision)
    quantized, evaluated = locate(paths, chosen)
    parent = repaired_variants(decision.get("repair")).get(chosen)
    record = read_json(quantized / RECORD)
    target = target_of(record["method"], record.get("target"))
    require_recorded_bytes(quantized / MODEL_DIR, record)
    calibration = read_json(Path(paths.calibration) / CALIBRATION_RECORD)
    build_scope, runtime_scope = scopes_of(record["method"])
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
        "evaluation": {"baseline": read_json(Path(paths.eval) / "baseline" / MEASUREMENTS),
                       "variant": read_json(evaluated / MEASUREMENTS)},
        "gate": {"chosen": chosen, **decision["variants"][chosen]},
        "git": git_state(Path.cwd()),
        "dvc_lock": dvc_lock_entries(Path("dvc.lock"), parent or chosen),
    }
    bundle_name = f"{config.model.name}-{chosen}"
    signing_key = Path(config.package.signing_key) if config.package.signing_key else None
    public_key = Path(config.package.public_key) if config.package.public_key else None
    if record["method"] == "gguf":
        base = read_json(Path(paths.gguf_base) / GGUF_BASE_RECORD)
        lineage["imatrix"] = base["imatrix"] if record["parameters"].get("imatrix") else None
        lineage["base_gguf"] = {key: base[key] for key in ("base_type", "base_sha256", "tensors_sha256", "pre_tokenizer")}
    # The behavioural probes as the variant answered them where it was validated.
    probes = (evaluated / BEHAVIOUR, evaluated / PROBES)
    behaviour = read_json(probes[0])
    lineage["behaviour"] = {key: behaviour[key] for key in ("runtime", "probes_sha256", "probe_tokens_sha256",
                                                            "tolerance", "spread")}
    build_bundle(Path(paths.package), bundle_name, quantized / MODEL_DIR, lineage, signing_key, extra=probes)
    result = verify(Path(paths.package) / bundle_name, lineage["fingerprints"]["runtime"],
                    public_key if signing_key else None)
    if result.exit_code:
        raise IntegrityError(f"the bundle just written does not verify: {result.problems}")
    signed = f", signed ({signing_key})" if signing_key else ""
    say(f"packaged {Path(paths.package) / bundle_name}{signed}")


if __name__ == "__main__":
    run_stage(main)
