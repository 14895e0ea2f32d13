"""The `quantbuild` command line.

    quantbuild compose [OVERRIDES...]   write params.yaml from conf/ (what DVC does on exp run)
    quantbuild exp -S KEY=VALUE ...     dvc exp run, restoring params.yaml when the run fails
    quantbuild verify [PATH] [--json] [--behaviour]   0 ok, 1 integrity failure, 2 drift (runtime or numerical)
    quantbuild lineage [PATH] [--json]  the chain behind a bundle, each link checked (exit 1 if broken)
    quantbuild summary                  the release summary of the last `dvc repro`
    quantbuild report [--out FILE]      one offline HTML page: charts of the ladder and the decision
    quantbuild compare A B              side-by-side metrics and gate outcome of two variants or bundles
    quantbuild pin FOLDER               print a model pin file (sha256 of every file)
    quantbuild keygen                   create an elliptic-curve signing key pair
    quantbuild release [--version V]    push the bundle's objects, tag it with GTO, assign a stage
    quantbuild audit [--json]           every release in the git history, its scores and digest checks
    quantbuild rollback REF             restore a release (version, stage@previous, git revision)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from quantbuild.errors import QuantbuildError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reproducible, release-gated quantized models.")


def _fail(err: QuantbuildError) -> None:
    typer.echo(f"quantbuild: {err}", err=True)
    raise typer.Exit(err.exit_code)


@app.command()
def compose(
    overrides: Optional[List[str]] = typer.Argument(None, help="Hydra overrides, e.g. quant=[gptq_3bit_g64]"),
    conf: Path = typer.Option(Path("conf"), help="Hydra config folder"),
    out: Path = typer.Option(Path("params.yaml"), help="where to write the composition"),
    reset: bool = typer.Option(False, "--reset", help="start again from conf/ alone, discarding the overrides "
                                                      "params.yaml records"),
) -> None:
    """Compose conf/ with Hydra and write params.yaml (validated against the schema). The overrides of earlier
    composes, recorded in params.yaml, stay applied (a new one for the same key replaces the old); --reset drops
    them. Prints what changed."""
    import yaml

    from quantbuild.config import compose as compose_conf
    from quantbuild.config import merge_overrides, params_changes, params_text, recorded_overrides
    from quantbuild.validation import validate_raw

    try:
        before = recorded_overrides(out) if out.is_file() and not reset else []
        applied = merge_overrides(before, overrides or [])
        composed = compose_conf(conf, applied)
        validate_raw(composed)
    except QuantbuildError as err:
        _fail(err)
    previous = yaml.safe_load(out.read_text()) if out.is_file() else None
    out.write_text(params_text(composed, applied))
    kept = [override for override in applied if override in before]
    typer.echo(f"wrote {out}" + (f" (kept earlier overrides: {' '.join(kept)}; --reset drops them)" if kept else ""))
    for line in params_changes(previous, composed):
        typer.echo(f"  {line}")


def _public_key(option: Optional[Path], params: Path = Path("params.yaml")) -> Optional[Path]:
    """--public-key, else package.public_key from params.yaml where there is one."""
    if option is not None or not params.is_file():
        return option
    import yaml

    configured = ((yaml.safe_load(params.read_text()) or {}).get("package") or {}).get("public_key")
    return Path(configured) if configured else None


PUBLIC_KEY = typer.Option(None, "--public-key", help="PEM public key to check a signed bundle with "
                                                     "(default: package.public_key in params.yaml)")


def _released(path: Optional[Path], params: Path = Path("params.yaml"), target: Optional[str] = None) -> Path:
    """`path`, or the bundle the last `dvc repro` released (artifacts/release/decision.json)
    for `target` (by default the run's primary target)."""
    if path is not None:
        return path
    from quantbuild.validation import load_config
    from quantbuild.hashing import read_json

    try:
        config = load_config(params)
        decision = Path(config.paths.release) / "decision.json"
        if not decision.is_file():
            raise QuantbuildError(f"{decision}: nothing released yet (run `dvc repro`, or name a bundle)")
        decided = read_json(decision)
        if target is not None and target in decided.get("targets", {}):
            decided = decided["targets"][target]
        chosen = decided["chosen"]
        if chosen is None:
            raise QuantbuildError(f"{decision}: the last gate released nothing (name a bundle)")
    except QuantbuildError as err:
        _fail(err)
    return Path(config.paths.package) / f"{config.model.name}-{chosen}"


RELEASED = typer.Argument(None, help="a bundle folder or a .gguf (default: the bundle the last `dvc repro` released)")


def _verify_workspace(repair: bool, as_json: bool) -> None:
    from quantbuild.release.releasing import repair_workspace, workspace_rot

    try:
        repaired = repair_workspace(Path(".")) if repair else []
        problems, checked = workspace_rot(Path("."))
    except QuantbuildError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps({"checked": checked, "repaired": repaired, "problems": problems}, indent=2))
    else:
        for line in repaired:
            typer.echo(f"repaired: {line}")
        for problem in problems:
            typer.echo(f"integrity: {problem}", err=True)
        if not problems:
            typer.echo(f"workspace: {checked} output files of dvc.lock re-hashed; the workspace and the DVC cache match")
    raise typer.Exit(1 if problems else 0)


@app.command()
def verify(path: Optional[Path] = RELEASED, as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
           public_key: Optional[Path] = PUBLIC_KEY,
           manifest: Optional[Path] = typer.Option(None, help="for a lone .gguf: a bundle's manifest.json to check "
                                                               "its bytes against"),
           behaviour: bool = typer.Option(False, "--behaviour", help="also rerun the bundle's behavioural probes on "
                                                                     "this runtime (exit 2 on numerical drift)"),
           probes: Optional[Path] = typer.Option(None, help="for a lone .gguf with --behaviour: the folder holding "
                                                            "its behaviour.json and probes.safetensors (default: "
                                                            "the file's folder)"),
           threads: Optional[int] = typer.Option(None, help="threads for --behaviour (default: all cores)"),
           target: Optional[str] = typer.Option(None, help="the deploy target to check the bundle for, e.g. "
                                                           "llama.cpp-cpu (default: the one this machine runs it on: "
                                                           "its GPU where the runtime can use one)"),
           workspace: bool = typer.Option(False, "--workspace", help="instead: re-hash every output file the current "
                                                                     "dvc.lock records, in the workspace and the DVC "
                                                                     "cache, naming each rotten one"),
           repair: bool = typer.Option(False, "--repair", help="with --workspace: first restore rotten files from "
                                                               "intact stored copies")) -> None:
    """Re-hash a bundle against its manifest, check its signature, compare the runtime and the deploy target it
    was validated on (a bundle never measured on this machine's target is not called validated: exit 2); with
    --behaviour, rerun that target's probes and compare what the model computes. A lone .gguf is checked against
    the lineage in its own metadata. With --workspace, the pipeline's outputs and their DVC cache objects are
    re-hashed against dvc.lock (DVC itself trusts unchanged sizes and mtimes)."""
    from quantbuild.release.verify import verify as verify_bundle
    from quantbuild.release.verify import verify_behaviour, verify_gguf
    from quantbuild.runtimes import RUN_TARGETS

    if workspace or repair:
        _verify_workspace(repair, as_json)

    if target is not None and target not in RUN_TARGETS:
        _fail(QuantbuildError(f"--target {target}: unknown (known: {', '.join(RUN_TARGETS)})"))
    path = _released(path, target=target)
    if path.suffix == ".gguf":
        result = verify_gguf(path, manifest, public_key=_public_key(public_key))
    else:
        # the project's own key (package.public_key) is a guess for a bundle built elsewhere
        result = verify_bundle(path, public_key=_public_key(public_key), target=target, key_named=public_key is not None)
    if behaviour and not result.problems:
        folder = probes or (path.parent if path.suffix == ".gguf" else path)
        if probes is None and path.suffix == ".gguf" and (folder / "targets").is_dir():
            # a file in a bundle validated per target: the record of the target it runs on here
            from quantbuild.release.verify import machine_target

            result.target = target or machine_target("llama.cpp")
        verify_behaviour(result, path, folder, threads)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        for problem in result.problems:
            typer.echo(f"integrity: {problem}", err=True)
        for key, old, new in result.drifted:
            if key.startswith("numerical drift"):
                typer.echo(f"{key} = {new}, tolerance {old}", err=True)
            else:
                typer.echo(f"drift: {key}: {old} -> {new}", err=True)
        if result.drifted and not result.problems:
            numerical = all(key.startswith("numerical drift") for key, _, _ in result.drifted)
            typer.echo("what this model computes here differs from what it computed where it was validated: "
                       "revalidate (`dvc repro`) before trusting it" if numerical else
                       "the runtime differs from the one this bundle was validated on: run `dvc repro` to revalidate",
                       err=True)
        if result.exit_code == 0:
            checked = (f" and its {result.behaviour['probes']} behavioural probes (KLD "
                       f"{result.behaviour['measured']['kld_mean']:.2g}, greedy match "
                       f"{result.behaviour['measured']['greedy_match']:.0%})") if result.behaviour else ""
            on = f" on {result.target}" if result.target else ""
            typer.echo(f"ok: {path} matches its manifest and this runtime{on}{checked}")
    raise typer.Exit(result.exit_code)


@app.command()
def summary(params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Print the release summary: variant chosen, size, key scores, package path."""
    from quantbuild.validation import load_config
    from quantbuild.report import release_summary

    try:
        typer.echo(release_summary(load_config(params)))
    except QuantbuildError as err:
        _fail(err)


@app.command()
def report(out: Path = typer.Option(Path("artifacts/report.html"), help="where to write the page"),
           params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Write one self-contained HTML page (works offline): size vs quality, per-family scores with
    intervals, latency and memory against the gate's limits, and the decision table."""
    from quantbuild.validation import load_config
    from quantbuild.report_html import write_report

    try:
        typer.echo(f"wrote {write_report(load_config(params), out)} (open it in a browser; no network needed)")
    except QuantbuildError as err:
        _fail(err)


@app.command()
def compare(
    left: str = typer.Argument(..., help="a variant name, 'baseline', or a bundle folder"),
    right: str = typer.Argument(..., help="a variant name, 'baseline', or a bundle folder"),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    """Side-by-side metrics of two variants (or two released bundles) and their gate outcome."""
    from quantbuild.validation import load_config
    from quantbuild.report import compare as compare_metrics

    try:
        typer.echo(compare_metrics(left, right, load_config(params)))
    except QuantbuildError as err:
        _fail(err)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exp(ctx: typer.Context) -> None:
    """`dvc exp run ARGS...`, leaving the workspace as it was when the run fails: DVC writes the
    composed params.yaml before the first stage, and keeps it after a failure."""
    import subprocess

    params = Path("params.yaml")
    before = params.read_bytes() if params.is_file() else None
    code = subprocess.run(["dvc", "exp", "run", *ctx.args]).returncode
    if code != 0 and before is not None and params.read_bytes() != before:
        params.write_bytes(before)
        typer.echo("quantbuild: the experiment failed; params.yaml is restored to what it was", err=True)
    raise typer.Exit(code)


@app.command()
def fanout(
    address: Optional[str] = typer.Option(None, help="the Ray head, HOST:6379, from a machine of the cluster, or "
                                                     "auto; default: a local cluster (ray:// is refused: the ray "
                                                     "extra installs no Ray Client)"),
    probe_timeout: Optional[float] = typer.Option(None, help="seconds to wait for an answer at --address before "
                                                             "refusing it (default 5, or "
                                                             "$QUANTBUILD_RAY_PROBE_TIMEOUT)"),
    workers: int = typer.Option(2, help="CPUs of the local cluster (without --address)"),
    remote: Optional[str] = typer.Option(None, help="the DVC remote the workers share (default: the repo's default "
                                                    "remote)"),
    repo: Optional[str] = typer.Option(None, help="where workers clone the repository from (default: this folder)"),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    """Build the ladder's stages on a Ray cluster through a shared DVC remote; afterwards
    `dvc repro` here restores every stage and runs only fingerprint (needs quantbuild[ray])."""
    from quantbuild.validation import load_config
    from quantbuild.fanout import fanout as fan_out

    try:
        if workers < 1:
            raise QuantbuildError(f"--workers={workers} is not allowed (allowed: >= 1)")
        config = load_config(params)
        record = fan_out(Path.cwd(), sorted(config.quant.variants), address, workers, remote, repo,
                         log=typer.echo, targets=list(config.eval.targets), probe_timeout_s=probe_timeout)
    except QuantbuildError as err:
        _fail(err)
    typer.echo(f"fanout: {len(record['tasks'])} tasks in {record['seconds']} s through {record['remote']}; "
               f"`dvc repro` here now restores every stage (only fingerprint runs)")


@app.command()
def pin(
    folder: Optional[Path] = typer.Argument(None, help="a local model folder"),
    hf: Optional[str] = typer.Option(None, help="a Hub repo id instead of a folder"),
    revision: Optional[str] = typer.Option(None, help="the 40-hex commit to pin (with --hf)"),
    name: Optional[str] = typer.Option(None, help="model name (default: folder or repo name)"),
) -> None:
    """Print a conf/model pin file: the source and the sha256 of every file."""
    from quantbuild.hashing import digest_tree

    if hf:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(hf, revision=revision))
        header = [f"name: {name or hf.split('/')[-1].lower()}", "source: hf", "path: null", f"repo_id: {hf}",
                  f"revision: {revision}"]
    elif folder is not None and folder.is_dir():
        header = [f"name: {name or folder.name}", "source: path", f"path: {folder.as_posix()}", "revision: null"]
    else:
        _fail(QuantbuildError(f"{folder}: folder not found (or pass --hf REPO --revision COMMIT)"))
    lines = header + ["allow_pickle: false", "files:"]
    lines += [f"  {file}: {digest}" for file, digest in digest_tree(folder).items() if not file.startswith(".")]
    sys.stdout.write("\n".join(lines) + "\n")


@app.command()
def lineage(path: Optional[Path] = RELEASED, as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
            public_key: Optional[Path] = PUBLIC_KEY) -> None:
    """The chain package -> weights -> baseline + calibration + params + fingerprints + commit
    (for a lone .gguf: what its own metadata records)."""
    from rich.console import Console

    from quantbuild.release.lineage import broken, gguf_lineage, render
    from quantbuild.release.lineage import lineage as build_lineage

    path = _released(path)
    try:
        key = _public_key(public_key)
        tree = gguf_lineage(path, key) if path.suffix == ".gguf" else build_lineage(path, Path("."), key)
    except QuantbuildError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(tree, indent=2))
    else:
        Console().print(render(tree))
    raise typer.Exit(1 if broken(tree) else 0)


@app.command()
def keygen(
    out: Path = typer.Option(Path("keys"), help="folder for the pair"),
    name: str = typer.Option("quantbuild-signing", help="file stem: NAME.key (private) and NAME.pub"),
) -> None:
    """Create an elliptic-curve (P-256) key pair for signing bundles; never commit the .key."""
    from quantbuild.release.signing import generate_keypair

    private, public = out / f"{name}.key", out / f"{name}.pub"
    try:
        generate_keypair(private, public)
    except QuantbuildError as err:
        _fail(err)
    typer.echo(f"wrote {private} (private, mode 600) and {public}\n"
               f"sign bundles with: package.signing_key={private} package.public_key={public}")


@app.command()
def release(
    version: Optional[str] = typer.Option(None, help="semantic version vX.Y.Z (default: GTO's next)"),
    stage: Optional[str] = typer.Option("prod", help="stage to assign ('' for none)"),
    push: bool = typer.Option(True, help="dvc push the released objects to the default remote first"),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    """Register the packaged bundle of the committed pipeline state with GTO."""
    from quantbuild.validation import load_config
    from quantbuild.release.releasing import release as run_release

    try:
        typer.echo(run_release(Path("."), load_config(params), version, stage or None, push))
    except QuantbuildError as err:
        _fail(err)


@app.command()
def audit(as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
          repair: bool = typer.Option(False, "--repair", help="first replace corrupted DVC cache/remote objects of "
                                                              "every release with an intact copy")) -> None:
    """Every release in the git history; flags those whose digests no longer match the DVC cache/remote,
    whose manifest is not the one released, or that were released signed and are now unsigned."""
    from quantbuild.release.releasing import audit as run_audit
    from quantbuild.release.releasing import audit_table, repair_releases

    try:
        if repair:
            done = repair_releases(Path("."))
            for line in done or ["nothing to repair: every stored copy is intact (or none is)"]:
                typer.echo(f"repair: {line}", err=True)
        rows = run_audit(Path("."))
    except QuantbuildError as err:
        _fail(err)
    typer.echo(json.dumps(rows, indent=2) if as_json else audit_table(rows))
    raise typer.Exit(1 if any(row["problems"] for row in rows) else 0)


@app.command()
def rollback(ref: str = typer.Argument(..., help="v1.2.0, NAME@v1.2.0, prod, prod@previous, prod@~2 or a git revision"),
             params: Path = typer.Option(Path("params.yaml")), public_key: Optional[Path] = PUBLIC_KEY) -> None:
    """Restore a release's dvc.lock, params.yaml and conf/, check its outputs out, verify it."""
    from quantbuild.validation import load_config
    from quantbuild.release.releasing import rollback as run_rollback

    try:
        message, code = run_rollback(Path("."), load_config(params).model.name, ref, _public_key(public_key))
    except QuantbuildError as err:
        _fail(err)
    typer.echo(message)
    raise typer.Exit(code)


def main() -> None:
    app()
