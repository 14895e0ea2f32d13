"""`quantbuild verify`: is this bundle exactly what was validated, on a runtime like this one?

Exit codes: 0 ok; 1 integrity failure (changed, missing or extra file, bad manifest, a
signature that does not verify with the given public key); 2 environment drift (the
runtime fingerprint differs: rerun `dvc repro` to revalidate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quantbuild.errors import IntegrityError, RuntimeUnavailable
from quantbuild.fingerprint import drift, fingerprints, target_fingerprint
from quantbuild.hashing import sha256_file
from quantbuild.release.manifest import MANIFEST, read_manifest, safe_relative
from quantbuild.release.signing import SIGNATURE, check_gguf_signature, check_signature
from quantbuild.gguf_artifacts import MODEL_FILE
from quantbuild.runtimes import target_device
from quantbuild.runtimes.llama_build import repack_allowed
from quantbuild.runtimes.protocol import LLAMA_CPP, TORCH, LoadSpec, open_runtime


@dataclass
class VerifyResult:
    bundle: str
    problems: list[str] = field(default_factory=list)
    drifted: list[tuple[str, object, object]] = field(default_factory=list)
    behaviour: dict | None = None
    # the deploy target checked (a bundle validated per target), e.g. llama.cpp-cuda
    target: str | None = None
    # what a one-line problem leaves out (a signature library's whole message)
    details: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 2 if self.drifted else 0

    def as_dict(self) -> dict:
        return {
            "bundle": self.bundle,
            "status": ("integrity_failure", "ok", "drift")[[1, 0, 2].index(self.exit_code)],
            "exit_code": self.exit_code,
            "problems": self.problems,
            **({"target": self.target} if self.target is not None else {}),
            "drift": [{"key": key, "recorded": old, "current": new} for key, old, new in self.drifted],
            **({"behaviour": self.behaviour} if self.behaviour is not None else {}),
            **({"details": self.details} if self.details else {}),
        }


def machine_target(runtime: str) -> str:
    """The deploy target this machine runs a bundle of `runtime` on: its GPU where the
    runtime can use one here (llama.cpp built with CUDA, torch seeing a CUDA GPU), else its
    CPU."""
    if runtime == LLAMA_CPP:
        from quantbuild.runtimes.llama_cpp import devices

        return f"{runtime}-{'cuda' if 'cuda' in devices() else 'cpu'}"
    import torch

    return f"{TORCH}-{'cuda' if torch.cuda.is_available() else 'cpu'}"


def verify(bundle: Path, current_runtime: dict | None = None, public_key: Path | None = None,
           target: str | None = None, key_named: bool = True) -> VerifyResult:
    """Re-hash every file against the manifest, check the signature where the bundle is
    signed, and compare runtime fingerprints: of the runtime, and of the deploy target
    checked (`target`, by default the one this machine runs the bundle on), which must be
    one the bundle was validated for."""
    result = VerifyResult(bundle=str(bundle))
    try:
        manifest = read_manifest(bundle)
        listed = set()
        for name, entry in sorted(manifest["files"].items()):
            path = safe_relative(bundle, name)
            listed.add(name)
            if not path.is_file():
                result.problems.append(f"{name}: missing")
            elif sha256_file(path) != entry.get("sha256"):
                result.problems.append(f"{name}: sha256 mismatch (manifest {entry.get('sha256')}, file {sha256_file(path)})")
        signed = "signing" in manifest
        for path in sorted(bundle.rglob("*")):
            name = path.relative_to(bundle).as_posix()
            expected = name == MANIFEST or name in listed or (signed and name == SIGNATURE)
            if not (path.is_dir() and not path.is_symlink()) and not (path.is_file() and not path.is_symlink()):
                result.problems.append(f"{name}: not a regular file (a bundle holds regular files only)")
            elif path.is_file() and not expected:
                result.problems.append(f"{name}: extra file not in the manifest")
        if signed:
            result.problems.extend(check_signature(bundle, manifest["signing"], public_key, result.details, key_named))
        elif public_key is not None:
            # No downgrade: whoever checks with a key expects a signature; a bundle whose
            # signature (and signing record) were stripped after its bytes changed must not pass.
            result.problems.append(f"{MANIFEST}: the bundle is not signed, and a public key ({public_key}) was given: "
                                   f"an unsigned bundle cannot verify against a key")
    except IntegrityError as err:
        result.problems.append(str(err))
        return result
    recorded = manifest.get("fingerprints", {}).get("runtime", {})
    scope = manifest.get("fingerprints", {}).get("runtime_scope", "runtime")
    current = (current_runtime if current_runtime is not None
               else fingerprints(recorded.get("torch_runtime"))[scope])
    result.drifted = drift(recorded, current)
    validated = manifest.get("targets")
    if validated:
        result.target = target or machine_target(manifest.get("deploy_runtime", LLAMA_CPP))
        if result.target not in validated:
            result.drifted.append((f"target {result.target}", f"validated for {', '.join(sorted(validated))}",
                                   "never measured on it: revalidate with eval.targets including it, or verify "
                                   "with --target"))
        else:
            # the device part of the target's fingerprint (a torch target records it in the runtime's)
            recorded_device = validated[result.target]["fingerprint"]["device"]
            current_device = target_fingerprint(target_device(result.target)) if recorded_device else {}
            result.drifted += [(f"{result.target}: {key}", old, new)
                               for key, old, new in drift(recorded_device, current_device)]
    return result


def verify_gguf(path: Path, manifest_path: Path | None = None, current_llama_cpp: dict | None = None,
                public_key: Path | None = None) -> VerifyResult:
    """A lone `.gguf`: its key/values and tensors against the digests its quantbuild
    metadata claims, their signature (where signed) against `public_key`, its bytes against
    a bundle manifest when given, and the llama.cpp environment it was built and validated
    on (a digest in its metadata) against this one."""
    from quantbuild.hashing import sha256_json
    from quantbuild.runtimes.gguf_file import PREFIX, check_lineage, metadata

    result = VerifyResult(bundle=str(path))
    try:
        result.problems.extend(check_lineage(path))
        result.problems.extend(check_gguf_signature(path, public_key))
        if manifest_path is not None:
            manifest = read_manifest(manifest_path.parent) if manifest_path.name == MANIFEST else read_manifest(manifest_path)
            entry = manifest["files"].get(path.name)
            if entry is None:
                result.problems.append(f"{path.name}: not listed in {manifest_path}")
            elif sha256_file(path) != entry.get("sha256"):
                result.problems.append(f"{path.name}: sha256 mismatch (manifest {entry.get('sha256')}, "
                                       f"file {sha256_file(path)})")
        recorded = metadata(path).get(f"{PREFIX}build_fingerprint_sha256")
    except IntegrityError as err:
        result.problems.append(str(err))
        return result
    if result.problems:
        return result
    current = current_llama_cpp if current_llama_cpp is not None else fingerprints()["llama_cpp"]
    if recorded != sha256_json(current):
        result.drifted.append(("llama_cpp fingerprint (sha256)", recorded, sha256_json(current)))
    return result


def verify_behaviour(result: VerifyResult, model: Path, probes: Path, threads: int | None = None) -> dict:
    """Rerun the behavioural probes stored in `probes/` on `model` (a GGUF file, or a model
    folder for the torch runtimes) on this runtime, after an integrity check that passed;
    each measure outside its tolerance is numerical drift (exit 2). A bundle validated per
    target keeps each target's probes under `targets/<target>/`: those of the target
    `result` checked are rerun, on that target's device."""
    from quantbuild import behaviour
    from quantbuild.errors import DataError

    if result.target is not None:
        probes = probes / "targets" / result.target
        if not probes.is_dir():
            if not any(key == f"target {result.target}" for key, _, _ in result.drifted):
                result.drifted.append((f"target {result.target}", "no probes recorded for it",
                                       "never measured on it: verify with --target naming one it was"))
            return {}
    try:
        info, _ = behaviour.load(probes)
        if info["runtime"] == LLAMA_CPP:
            from quantbuild.fingerprint import cpu_info

            path = model if model.suffix == ".gguf" else model / MODEL_FILE
            device = target_device(result.target) if result.target else "cpu"
            spec = LoadSpec(LLAMA_CPP, path, kv_type=info["kv_cache_type"], repack=repack_allowed(cpu_info()["isa"]),
                            device=device)
        else:
            # on the device and kernels the probes were recorded with: a GPU bundle on a
            # machine without one, or a kernel that no longer loads, is drift, not a crash
            import torch

            recorded = str(info.get("device", "cpu"))
            if recorded.startswith("cuda") and not torch.cuda.is_available():
                result.drifted.append(("runtime: the probes' device", recorded, "cpu (torch sees no CUDA GPU here)"))
                return {}
            spec = LoadSpec(TORCH, model, load_runtime=info.get("load_runtime", "kernel"),
                            device=recorded.split(":")[0], kernels=info.get("gpu_kernels") or {})
        with open_runtime(spec) as runtime:
            outcome = behaviour.check(runtime, probes, threads=threads)
    except (IntegrityError, DataError) as err:
        result.problems.append(str(err))
        return {}
    except RuntimeUnavailable as err:
        result.drifted.append(("runtime: the probes' kernels", info.get("gpu_kernels"), str(err)))
        return {}
    for measure, value, tolerance in outcome["drift"]:
        result.drifted.append((f"numerical drift: {measure}", tolerance, round(value, 9)))
    result.behaviour = outcome
    return outcome
