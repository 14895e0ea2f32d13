"""`quantbuild release`, `audit` and `rollback`: the user-facing side of the registry.

release: a clean, up-to-date, verified pipeline state is pushed to the DVC remote and
tagged with GTO. audit: every release's manifest, read back from the cache/remote by the
md5s its dvc.lock recorded, with every digest re-checked. rollback: a release's dvc.lock,
params.yaml and conf/ are restored, its outputs checked out (pulled where the cache lacks
them) and verified, and what changed is printed. verify --workspace (`workspace_rot`):
every file the current dvc.lock records, in the workspace and in the DVC cache, re-hashed
(DVC trusts a file whose size and mtime did not change, iterative/dvc#9641), each rotten
one named with how to restore it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from quantbuild.config import Config
from quantbuild.hashing import read_json, sha256_file
from quantbuild.release.registry import (PACKAGE_STAGE, ReleaseError, dvc, file_digests, find_object, git, lock_at,
                                 object_copies, object_stores, package_out, read_released_manifest, register,
                                 release_record, releases, released_files, describe_missing, move_stage, repair,
                                 repository_lock, require_clean, resolve, stage_history)
from quantbuild.release.verify import verify

# Stages whose "changed" status does not make a release stale: the fingerprint stage is
# always_changed by design; drift it detects shows up in the stages that depend on it.
ALWAYS_CHANGED = {"fingerprint"}


def _stale_stages(repo: Path) -> list[str]:
    result = dvc(repo, "status", "--json")
    if result.returncode != 0:
        raise ReleaseError(f"dvc status failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    status = json.loads(result.stdout or "{}")
    return sorted(name for name in status if name.split(":")[-1] not in ALWAYS_CHANGED)


def release(repo: Path, config: Config, version: Optional[str], stage: Optional[str], push: bool) -> str:
    with repository_lock(repo, "release"):
        return _release(repo, config, version, stage, push)


def _release(repo: Path, config: Config, version: Optional[str], stage: Optional[str], push: bool) -> str:
    require_clean(repo, "release")
    if not git(repo, "ls-files", "dvc.lock", check=False):
        raise ReleaseError("release: dvc.lock is not committed; run `dvc repro` and commit dvc.lock first")
    stale = _stale_stages(repo)
    if stale:
        raise ReleaseError(f"release: the pipeline is not up to date ({', '.join(stale)} changed); "
                           f"run `dvc repro` and commit dvc.lock first")
    decision = read_json(Path(config.paths.release) / "decision.json")
    chosen = decision.get("chosen")
    if not chosen:
        raise ReleaseError("release: the gate released no variant (see `quantbuild summary`)")
    bundle = Path(config.paths.package) / f"{config.model.name}-{chosen}"
    public_key = Path(config.package.public_key) if config.package.public_key else None
    checked = verify(bundle, public_key=public_key)
    if checked.exit_code:
        reasons = checked.problems or [f"{key}: {old} -> {new}" for key, old, new in checked.drifted]
        raise ReleaseError(f"release: {bundle} does not verify ({reasons[0]}); run `dvc repro` to revalidate")
    if push and _has_remote(repo):
        pushed = dvc(repo, "push")
        if pushed.returncode != 0:
            raise ReleaseError(f"release: dvc push failed: {(pushed.stderr or pushed.stdout).strip().splitlines()[-1]}")
    manifest = read_json(bundle / "manifest.json")
    signed = "signed" if "signing" in manifest else "unsigned"
    message = (f"{bundle.name}: {manifest['variant']['method']} {manifest['variant']['bits_per_weight']} bits/weight, "
               f"manifest sha256 {sha256_file(bundle / 'manifest.json')}, {signed}")
    registered = register(repo, config.model.name, version, stage, message)
    head = git(repo, "rev-parse", "HEAD")
    lines = [f"released {config.model.name}@{registered} at commit {head[:10]}: {bundle}"]
    if stage:
        lines.append(f"stage {stage} -> {registered}")
    lines.append("push the tags to share the release: git push --tags")
    return "\n".join(lines)


def _has_remote(repo: Path) -> bool:
    result = dvc(repo, "remote", "default")
    return result.returncode == 0 and bool(result.stdout.strip())


def _scores(manifest: dict[str, Any]) -> dict[str, Any]:
    measured = manifest["evaluation"]["variant"]
    scores = {"perplexity": measured.get("perplexity"), "kld_mean": measured.get("kld_mean"),
              "top1_agreement": measured.get("top1_agreement")}
    scores.update({family: entry["score"] for family, entry in sorted(measured.get("families", {}).items())})
    return scores


def record_problems(record: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """A stored manifest against what its release recorded: the same bytes, and still signed
    if it was released signed (a signature cannot be stripped along with its record)."""
    problems = []
    if record.get("manifest_sha256") not in (None, manifest.get("_sha256")):
        problems.append("manifest.json: not the manifest this version was released with (its sha256 differs "
                        "from the release record)")
    if record.get("signed") and "signing" not in manifest:
        problems.append("manifest.json: released signed, now unsigned (signature downgrade)")
    return problems


def audit(repo: Path) -> list[dict[str, Any]]:
    rows = []
    for found in releases(repo):
        row: dict[str, Any] = {"artifact": found.artifact, "version": found.version, "stages": found.stages,
                               "commit": found.commit, "variant": None, "bundle": None, "scores": {},
                               "digests": {}, "problems": []}
        out = package_out(lock_at(repo, found.commit))
        if out is None:
            row["problems"].append("no package output in this commit's dvc.lock")
        else:
            manifest, problems = read_released_manifest(repo, out)
            row["problems"] += problems
            record = release_record(repo, found.artifact, found.version)
            row["signed"] = record.get("signed")
            if manifest is not None:
                row["problems"] += record_problems(record, manifest)
                row.update(variant=manifest["variant"]["variant"], bundle=manifest["bundle"], scores=_scores(manifest),
                           digests={name: entry["sha256"] for name, entry in manifest["files"].items()
                                    if name.endswith((".safetensors", ".gguf"))})
        rows.append(row)
    return rows


def audit_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no releases in this repository (create one with `quantbuild release`)"
    lines = [f"{'version':<9} {'stages':<10} {'commit':<11} {'variant':<24} {'ppl':>7} {'kld':>8} {'weights sha256':<16} status"]
    for row in rows:
        scores = row["scores"]
        digest = next(iter(row["digests"].values()), "")[:14]
        status = "ok" if not row["problems"] else "FLAGGED: " + "; ".join(row["problems"])
        ppl = f"{scores['perplexity']:.4f}" if scores.get("perplexity") is not None else "-"
        kld = f"{scores['kld_mean']:.5f}" if scores.get("kld_mean") is not None else "-"
        lines.append(f"{row['version']:<9} {','.join(row['stages']) or '-':<10} {row['commit'][:10]:<11} "
                     f"{row['variant'] or '-':<24} {ppl:>7} {kld:>8} {digest:<16} {status}")
    return "\n".join(lines)


def _current_manifest(repo: Path) -> Optional[dict[str, Any]]:
    lock_path = repo / "dvc.lock"
    out = package_out(yaml.safe_load(lock_path.read_text()) or {}) if lock_path.is_file() else None
    return read_released_manifest(repo, out)[0] if out else None


def _restore_outputs(repo: Path, stages: list[str]) -> bool:
    """`dvc checkout` (then `dvc pull`) of `stages`, or of the whole pipeline when empty."""
    return dvc(repo, "checkout", "--force", *stages).returncode == 0 or \
        dvc(repo, "pull", "--force", *stages).returncode == 0


def _needed_stages(lock: dict[str, Any], manifest: Optional[dict[str, Any]]) -> list[str]:
    """The stages whose outputs a release needs: the package and those that produced the
    bundle (its manifest's dvc_lock); not every entry a long-lived dvc.lock still keeps for
    variants no longer in the pipeline."""
    recorded = set((manifest or {}).get("dvc_lock", {})) | {PACKAGE_STAGE}
    return sorted(name for name in lock.get("stages", {}) if name in recorded and name not in ALWAYS_CHANGED)


def _stage_objects(repo: Path, lock: dict[str, Any], stages: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """((name, md5) of every object the stages' outputs consist of, problems reading listings)."""
    objects, problems = [], []
    for name in stages:
        for out in lock["stages"][name].get("outs", []):
            md5 = out.get("md5")
            if not md5:
                continue
            objects.append((out["path"], md5))
            if md5.endswith(".dir"):
                files, unreadable = released_files(repo, out)
                problems += unreadable
                objects += [(f"{out['path']}/{relpath}", file_md5) for relpath, file_md5 in files.items()]
    return objects, problems


def _missing_objects(repo: Path, lock: dict[str, Any], stages: list[str]) -> list[str]:
    """Objects of the stages with no intact copy anywhere (missing, or corrupted everywhere)."""
    objects, problems = _stage_objects(repo, lock, stages)
    return problems + [describe_missing(repo, md5, name) for name, md5 in objects if find_object(repo, md5) is None]


def _repair_objects(repo: Path, lock: dict[str, Any], stages: list[str]) -> list[str]:
    """Replace corrupted copies of the stages' objects with intact ones; what was done."""
    objects, _ = _stage_objects(repo, lock, stages)
    return [done for _, md5 in objects for done in [repair(repo, md5)] if done]


def repair_releases(repo: Path) -> list[str]:
    """`quantbuild audit --repair`: every released commit's package and lineage objects, and
    the workspace's, restored from an intact copy where a copy is corrupted."""
    with repository_lock(repo, "audit --repair"):
        done: list[str] = []
        commits = [found.commit for found in releases(repo)]
        for lock in [lock_at(repo, commit) for commit in commits] + [_workspace_lock(repo)]:
            stages = [name for name in lock.get("stages", {})]
            for line in _repair_objects(repo, lock, stages):
                if line not in done:
                    done.append(line)
        return done


def _rot(repo: Path, lock: dict[str, Any], stage: str) -> list[tuple[str, str, str, Optional[Path]]]:
    """(file, md5, what is wrong, an intact stored copy or None) for each file of the stage's
    outputs whose workspace or stored bytes no longer hash to what dvc.lock recorded."""
    objects, problems = _stage_objects(repo, lock, [stage])
    rotten: list[tuple[str, str, str, Optional[Path]]] = [("", "", problem, None) for problem in problems]
    for name, md5 in objects:
        if md5.endswith(".dir"):
            continue
        copies = object_copies(repo, md5)
        intact = next((path for _, path, good in copies if good), None)
        corrupt = [label for label, _, good in copies if not good]
        if corrupt:
            rotten.append((name, md5, f"the stored object is corrupted in the {' and the '.join(corrupt)}", intact))
        path = repo / name
        if not path.is_file():
            rotten.append((name, md5, "missing from the workspace", intact))
        elif file_digests(path)[0] != md5:
            rotten.append((name, md5, "the workspace copy differs from dvc.lock", intact))
    return rotten


def workspace_rot(repo: Path) -> tuple[list[str], int]:
    """`quantbuild verify --workspace`: (lines, files checked) for every output file the
    current dvc.lock records, each rotten one with how to restore it."""
    lock = _workspace_lock(repo)
    lines, checked = [], 0
    # the fingerprint stage runs on every repro, and its output is not kept in the cache
    for stage in sorted(set(lock.get("stages", {})) - ALWAYS_CHANGED):
        objects, _ = _stage_objects(repo, lock, [stage])
        checked += sum(1 for _, md5 in objects if not md5.endswith(".dir"))
        for name, md5, what, intact in _rot(repo, lock, stage):
            if intact is None:
                how = f"no intact copy is stored: rebuild it with `dvc repro --force {stage}`"
            elif "stored object" in what:
                how = "`quantbuild audit --repair` restores it from an intact copy"
            else:
                how = "`quantbuild verify --workspace --repair` restores it from the stored object"
            lines.append(f"{name}: {what} ({md5[:12]}); {how}" if md5 else f"{what}; {how}")
    return lines, checked


def repair_workspace(repo: Path) -> list[str]:
    """`quantbuild verify --workspace --repair`: corrupted stored objects replaced from intact
    copies, then rotten workspace files from the stored objects; what was done."""
    with repository_lock(repo, "verify --workspace --repair"):
        lock = _workspace_lock(repo)
        stages = sorted(set(lock.get("stages", {})) - ALWAYS_CHANGED)
        return _repair_objects(repo, lock, stages) + _restore_rotten(repo, lock, stages)


def _restore_rotten(repo: Path, lock: dict[str, Any], stages: list[str]) -> list[str]:
    """Workspace files of `stages` that DVC left rotten (same size and mtime: not re-checked
    out), replaced by their intact stored copy; what was done, and what could not be."""
    import os
    import shutil

    done = []
    for stage in stages:
        for name, md5, what, intact in _rot(repo, lock, stage):
            if "workspace" not in what:
                continue
            if intact is None:
                done.append(f"{name}: {what}, and no intact copy is stored (rebuild: `dvc repro --force {stage}`)")
                continue
            path = repo / name
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.restore")
            shutil.copyfile(intact, temporary)
            os.replace(temporary, path)
            done.append(f"{name}: {what}; restored from the stored object {md5[:12]}")
    return done


def _workspace_lock(repo: Path) -> dict[str, Any]:
    path = repo / "dvc.lock"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def rollback(repo: Path, artifact: str, ref: str, public_key: Optional[Path]) -> tuple[str, int]:
    with repository_lock(repo, "rollback"):
        return _rollback(repo, artifact, ref, public_key)


def _rollback(repo: Path, artifact: str, ref: str, public_key: Optional[Path]) -> tuple[str, int]:
    commit, label, stage_move = resolve(repo, ref, artifact)
    require_clean(repo, "rollback")
    lock = lock_at(repo, commit)
    out = package_out(lock)
    if out is None:
        raise ReleaseError(f"rollback target {ref!r} (commit {commit[:10]}) has no packaged output in its dvc.lock")
    target, problems = read_released_manifest(repo, out)
    # Objects are looked up in the cache and a folder remote here; another remote (S3, SSH)
    # can only be asked by `dvc pull` itself.
    remote_elsewhere = _has_remote(repo) and len(object_stores(repo)) == 1
    needed = _needed_stages(lock, target)
    missing = _missing_objects(repo, lock, needed)
    if (target is None or missing) and not remote_elsewhere:
        raise ReleaseError(f"rollback to {label}: objects missing from the DVC cache and remote "
                           f"({(missing or problems)[0]}); nothing was changed")
    # Corrupted cache copies would be checked out as they are: replace them from intact ones.
    repaired = _repair_objects(repo, lock, needed)
    before = _current_manifest(repo)
    git(repo, "restore", f"--source={commit}", "--staged", "--worktree", "--", "dvc.lock", "params.yaml", "conf")
    partial = not _restore_outputs(repo, [])
    if partial and not _restore_outputs(repo, needed):
        raise ReleaseError(f"rollback to {label}: dvc checkout and dvc pull of {', '.join(needed)} failed; undo with "
                           f"`git restore --source=HEAD --staged --worktree -- dvc.lock params.yaml conf`")
    # DVC does not re-check a workspace file whose size and mtime held: re-hash what was restored
    restored = _restore_rotten(repo, lock, needed)
    target = target or _current_manifest(repo)
    bundle = repo / out["path"] / target["bundle"]
    # the signing policy is the release's own: one made before signing is checked unsigned
    unsigned = public_key is not None and "signing" not in target
    result = verify(bundle, public_key=None if unsigned else public_key)
    lines = [f"rolled back to {label} (commit {commit[:10]}): dvc.lock, params.yaml and conf/ restored, outputs checked out"]
    lines += [f"repaired: {line}" for line in repaired + restored]
    if unsigned:
        lines.append(f"warning: {label} was released unsigned (before package.private_key was set): its bundle is "
                     f"verified by its manifest alone, not against {public_key}")
    lines += _changes(before, target)
    if partial:
        lines.append("note: outputs of stages the release does not need could not be restored (their objects are "
                     "gone); `dvc repro` rebuilds them")
    status = {0: "ok", 1: "INTEGRITY FAILURE", 2: "runtime drift"}[result.exit_code]
    lines.append(f"verify {bundle}: {status}")
    lines += [f"  {problem}" for problem in result.problems]
    lines += [f"  drift: {key}: {old} -> {new}" for key, old, new in result.drifted]
    if stage_move is not None and result.exit_code != 1:
        stage, version = stage_move
        if stage_history(repo, artifact, stage)[:1] != [version]:
            move_stage(repo, artifact, stage, version)
            lines.append(f"registry: {stage} now points at {artifact}@{version} (`quantbuild audit` shows it)")
    lines.append(f"commit the restored files to make this the new HEAD: git commit -am 'rollback to {label}'")
    return "\n".join(lines), result.exit_code


def _changes(before: Optional[dict[str, Any]], after: dict[str, Any]) -> list[str]:
    if before is None:
        return [f"variant: {after['variant']['variant']} (nothing was packaged before)"]
    lines = [f"variant: {before['variant']['variant']} -> {after['variant']['variant']}"]
    old_scores, new_scores = _scores(before), _scores(after)
    for key in sorted(set(old_scores) | set(new_scores)):
        old, new = old_scores.get(key), new_scores.get(key)
        if old != new:
            lines.append(f"  {key}: {old} -> {new}")
    old_files = {name: entry["sha256"] for name, entry in before["files"].items()}
    for name, entry in sorted(after["files"].items()):
        if old_files.get(name) != entry["sha256"]:
            lines.append(f"  {name}: {str(old_files.get(name))[:12]} -> {entry['sha256'][:12]}")
    return lines
