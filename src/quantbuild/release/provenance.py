"""`provenance.intoto.json`: an in-toto Statement v1 whose predicate is SLSA provenance v1.

Subjects are the packaged files (sha256); externalParameters are the resolved params;
resolvedDependencies are the baseline files, the calibration set, the libraries and the
source commit; the builder is identified by the build fingerprint. No timestamps, so the
same inputs give the same statement bytes.
"""

from __future__ import annotations

from typing import Any

from quantbuild.hashing import sha256_json

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://github.com/quantbuild/quantbuild/build-types/dvc-repro/v1"
PROVENANCE = "provenance.intoto.json"


def statement(subjects: dict[str, str], lineage: dict[str, Any]) -> dict[str, Any]:
    """`subjects` maps packaged file name -> sha256; `lineage` is the manifest's lineage."""
    model, calibration, variant = lineage["model"], lineage["calibration"], lineage["variant"]
    dependencies = [
        {"name": f"baseline/{name}", "uri": f"{model['source']}:{model['location']}/{name}",
         "digest": {"sha256": digest}, "annotations": {"revision": model.get("revision")}}
        for name, digest in sorted(model["files"].items())
    ]
    dependencies.append({"name": "calibration", "digest": {"sha256": calibration["digest"]},
                         "annotations": {"composition": calibration["composition"], "samples": calibration["samples"],
                                         "seq_len": calibration["seq_len"], "seed": calibration["seed"]}})
    if lineage.get("imatrix"):
        imatrix = lineage["imatrix"]
        dependencies.append({"name": "imatrix", "digest": {"sha256": imatrix["sha256"]},
                             "annotations": {"tokens": imatrix["tokens_used"], "composition": imatrix["composition"],
                                             "text_sha256": imatrix["text_sha256"]}})
    dependencies += [{"name": f"pypi/{name}", "uri": f"pkg:pypi/{name}@{version}"}
                     for name, version in sorted(variant["libraries"].items()) if version and name != "llama.cpp"]
    if variant["libraries"].get("llama.cpp"):
        dependencies.append({"name": "llama.cpp", "uri": f"git+https://github.com/ggml-org/llama.cpp@"
                                                         f"{variant['libraries']['llama.cpp']}"})
    commit = lineage["git"]["commit"]
    if commit:
        dependencies.append({"name": "source", "uri": "git+quantbuild-pipeline", "digest": {"gitCommit": commit},
                             "annotations": {"dirty": lineage["git"]["dirty"]}})
    build = lineage["fingerprints"]["build"]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest}} for name, digest in sorted(subjects.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"params": lineage["params"], "variant": variant["variant"]},
                "internalParameters": {"dvc_lock": lineage["dvc_lock"]},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": f"urn:quantbuild:builder:sha256:{sha256_json(build)}",
                            "version": {key: str(value) for key, value in sorted(_flatten(build).items())}},
                "metadata": {"invocationId": f"{lineage['model']['name']}-{variant['variant']}@{commit or 'uncommitted'}"},
            },
        },
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}
