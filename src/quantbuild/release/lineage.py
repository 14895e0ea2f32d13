"""`quantbuild lineage`: the chain behind a bundle, each link checked.

package (bundle integrity) -> quantized weights (the quantize record's digests) ->
baseline (source, revision, per-file digests against the pin) + calibration set (digest,
composition, against the calibrate stage's record) + params + fingerprints + commit, and
the dvc.lock entries the bundle recorded against the project's current dvc.lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quantbuild.hashing import read_json
from quantbuild.release.manifest import read_manifest
from quantbuild.release.registry import git
from quantbuild.release.verify import verify

OK, DIFFERS, UNCHECKED, WARNING = "ok", "differs", "not checked", "warning"


def _link(name: str, status: str, detail: str, facts: dict[str, Any], children: list | None = None) -> dict:
    return {"link": name, "status": status, "detail": detail, "facts": facts, "children": children or []}


def _lock_status(recorded: dict[str, Any], lock_path: Path) -> tuple[str, str]:
    if not lock_path.is_file():
        return UNCHECKED, f"no {lock_path} here"
    current = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})

    def outs(entry: dict) -> list:
        return [(out.get("path"), out.get("md5")) for out in entry.get("outs", [])]

    changed = sorted(name for name, entry in recorded.items() if outs(current.get(name, {})) != outs(entry))
    if changed:
        return DIFFERS, f"outputs of {', '.join(changed)} changed since (rebuilt after this bundle)"
    return OK, f"{len(recorded)} stage entries match {lock_path}"


def lineage(bundle: Path, project: Path = Path("."), public_key: Path | None = None) -> dict[str, Any]:
    manifest = read_manifest(bundle)
    result = verify(bundle, public_key=public_key)
    model, variant, calibration = manifest["model"], manifest["variant"], manifest["calibration"]

    model_files = {name: entry["sha256"] for name, entry in manifest["files"].items() if name in variant["files"]}
    weights_ok = model_files == {name: digest for name, digest in variant["files"].items()}
    weights = _link("quantized weights", OK if weights_ok else DIFFERS,
                    "bundle files match the quantize record" if weights_ok else "bundle files differ from the quantize record",
                    {"variant": variant["variant"], "method": variant["method"], "parameters": variant["parameters"],
                     "bits_per_weight": variant["bits_per_weight"], "libraries": variant["libraries"],
                     "files": variant["files"]})

    params_path = project / "params.yaml"
    pinned = (yaml.safe_load(params_path.read_text()) or {}).get("model", {}).get("files") if params_path.is_file() else None
    if pinned is None:
        baseline_status, baseline_detail = UNCHECKED, "no params.yaml here"
    elif pinned == model["files"]:
        baseline_status, baseline_detail = OK, "digests match the pin in params.yaml"
    else:
        baseline_status, baseline_detail = DIFFERS, "the pin in params.yaml has other digests (the baseline changed since)"
    baseline = _link("baseline", baseline_status, baseline_detail,
                     {"name": model["name"], "source": model["source"], "location": model["location"],
                      "revision": model.get("revision"), "files": model["files"]})

    calibration_dir = manifest["params"].get("paths", {}).get("calibration", "artifacts/calibration")
    record_path = project / calibration_dir / "calibration_record.json"
    if record_path.is_file():
        current = read_json(record_path)["digest"]
        calibration_status = OK if current == calibration["digest"] else DIFFERS
        calibration_detail = f"{'matches' if current == calibration['digest'] else 'differs from'} {record_path}"
    else:
        calibration_status, calibration_detail = UNCHECKED, f"no {record_path} here"
    calibration_link = _link("calibration set", calibration_status, calibration_detail,
                             {"digest": calibration["digest"], "samples": calibration["samples"],
                              "composition": calibration["composition"]})

    lock_status, lock_detail = _lock_status(manifest.get("dvc_lock", {}), project / "dvc.lock")
    commit = manifest["git"]["commit"]
    if not commit:
        commit_status, commit_detail = UNCHECKED, "not recorded (built outside git)"
    elif not git(project, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}", check=False):
        commit_status, commit_detail = DIFFERS, "not in this repository's history"
    elif manifest["git"]["dirty"]:
        commit_status, commit_detail = WARNING, ("in this repository's history, but built from a tree with "
                                                 "uncommitted changes: the commit alone does not rebuild it")
    else:
        commit_status, commit_detail = OK, "in this repository's history"
    fingerprints = manifest["fingerprints"]
    links = [
        weights,
        baseline,
        calibration_link,
        _link("params", OK, "resolved params the stages ran with",
              {"quant": manifest["params"].get("quant", {}).get("variants", {}).get(variant["variant"]),
               "seed": manifest["params"].get("seed"), "gate": manifest.get("gate")}),
        _link("fingerprints", OK if not result.drifted else DIFFERS,
              "runtime matches this machine" if not result.drifted else f"{len(result.drifted)} runtime keys drifted",
              {"build": fingerprints["build"], "runtime": fingerprints["runtime"]}),
        _behaviour_link(bundle, manifest) if not result.problems else
        _link("behaviour", UNCHECKED, "the bundle failed its integrity check", {}),
        _link("dvc.lock", lock_status, lock_detail, {"stages": sorted(manifest.get("dvc_lock", {}))}),
        _link("commit", commit_status, commit_detail, {"commit": commit, "dirty": manifest["git"]["dirty"]}),
    ]
    integrity = "ok" if not result.problems else "; ".join(result.problems)
    return _link("package", OK if not result.problems else DIFFERS, integrity,
                 {"bundle": str(bundle), "schema": manifest["schema"], "signed": "signing" in manifest,
                  "files": {name: entry["sha256"] for name, entry in manifest["files"].items()}}, links)


def _behaviour_link(bundle: Path, manifest: dict[str, Any]) -> dict:
    """The bundle's behavioural probes rerun on this runtime: what the model computes now
    against what it computed where it was validated."""
    from quantbuild.behaviour import BEHAVIOUR
    from quantbuild.release.verify import VerifyResult, machine_target, verify_behaviour

    # a bundle validated per deploy target: the probes of the target this machine runs it on
    target = machine_target(manifest.get("deploy_runtime", "llama.cpp")) if manifest.get("targets") else None
    if not (bundle / ("targets/" + target if target else "") / BEHAVIOUR).is_file():
        where = f" for {target}" if target else ""
        return _link("behaviour", UNCHECKED, f"no behavioural probes{where} in this bundle", {})
    checked = VerifyResult(bundle=str(bundle), target=target)
    outcome = verify_behaviour(checked, bundle, bundle)
    if checked.problems:
        return _link("behaviour", DIFFERS, "; ".join(checked.problems), {})
    drift = [f"{key[len('numerical drift: '):]} {new} (tolerance {old})" for key, old, new in checked.drifted]
    detail = ("numerical drift: " + ", ".join(drift)) if drift else \
        f"{outcome['probes']} probes match on this runtime (KLD {outcome['measured']['kld_mean']:.2g})"
    return _link("behaviour", DIFFERS if drift else OK, detail,
                 {"measured": outcome["measured"], "tolerance": outcome["tolerance"],
                  "recorded": manifest.get("behaviour", {}).get("spread")})


def gguf_lineage(path: Path, public_key: Path | None = None) -> dict[str, Any]:
    """The chain a lone `.gguf` carries in its metadata: variant, baseline, calibration,
    importance matrix, base GGUF and the build fingerprint, with its tensors checked."""
    from quantbuild.runtimes.gguf_file import PREFIX, metadata
    from quantbuild.release.verify import verify_gguf

    values = metadata(path)
    lineage = {key[len(PREFIX):]: value for key, value in values.items() if key.startswith(PREFIX)}
    result = verify_gguf(path, public_key=public_key)  # the digests, the signature and the environment
    problems = result.problems
    variant, baseline = lineage.get("variant") or {}, lineage.get("baseline") or {}
    calibration, imatrix = lineage.get("calibration") or {}, lineage.get("imatrix")
    links = [
        _link("quantized weights", OK if not problems else DIFFERS, "tensors match quantbuild.tensors_sha256"
              if not problems else "; ".join(problems),
              {"variant": variant.get("name"), "method": variant.get("method"),
               "parameters": variant.get("parameters"), "tensors_sha256": lineage.get("tensors_sha256")}),
        _link("baseline", UNCHECKED, "as recorded in the file", {key: baseline.get(key) for key in
                                                                 ("name", "source", "location", "revision", "files")}),
        _link("calibration set", UNCHECKED, "as recorded in the file",
              {"digest": calibration.get("digest"), "samples": calibration.get("samples"),
               "composition": calibration.get("composition")}),
        _link("importance matrix", UNCHECKED if imatrix else OK, "as recorded in the file" if imatrix else "none used",
              imatrix or {}),
        _link("base gguf", UNCHECKED, "the file it was quantized from", lineage.get("base_gguf") or {}),
        _link("fingerprints", OK if not result.drifted else DIFFERS,
              "llama.cpp environment matches this machine" if not result.drifted
              else "llama.cpp environment differs from the one it was built and validated on",
              {"build_fingerprint_sha256": lineage.get("build_fingerprint_sha256")}),
    ]
    status = OK if not problems and lineage.get("schema") else DIFFERS
    return _link("gguf file", status, "ok" if status == OK else "; ".join(problems) or "no quantbuild lineage",
                 {"file": str(path), "schema": lineage.get("schema"), "manifest_schema": lineage.get("manifest_schema")},
                 links)


def _brief(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    if isinstance(value, dict):
        return f"{len(value)} entries" if len(value) > 3 else ", ".join(f"{k}={_brief(v)}" for k, v in value.items())
    if isinstance(value, list):
        return f"{len(value)} items" if len(value) > 4 else ", ".join(_brief(v) for v in value)
    return str(value)


def render(tree: dict[str, Any]) -> Any:
    """A compact rich Tree of the chain: one line per link, its scalar facts beside it
    (digests shortened; `--json` has everything)."""
    from rich.tree import Tree

    colour = {OK: "green", DIFFERS: "red", UNCHECKED: "yellow", WARNING: "yellow"}

    def label(link: dict) -> str:
        facts = [f"{key}={_brief(value)}" for key, value in link["facts"].items()
                 if not isinstance(value, (dict, list)) and value is not None]
        extra = f" [dim]({'; '.join(facts)})[/dim]" if facts else ""
        return f"[bold]{link['link']}[/bold] [{colour[link['status']]}]{link['status']}[/] — {link['detail']}{extra}"

    root = Tree(label({**tree, "facts": {}}))
    for link in tree["children"]:
        root.add(label(link))
    return root


def broken(tree: dict[str, Any]) -> bool:
    return tree["status"] != OK or any(link["status"] == DIFFERS for link in tree["children"])
