"""The `quantbuild` command line.

    quantbuild compose [OVERRIDES...]   write params.yaml from conf/ (what DVC does on exp run)
    quantbuild verify PATH [--json]     0 ok, 1 integrity failure, 2 environment drift
    quantbuild summary                  the release summary of the last `dvc repro`
    quantbuild compare A B              side-by-side metrics and gate outcome of two variants or bundles
    quantbuild pin FOLDER               print a model pin file (sha256 of every file)
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
) -> None:
    """Compose conf/ with Hydra and write params.yaml (validated against the schema)."""
    import yaml

    from quantbuild.config import compose as compose_conf
    from quantbuild.config import validate_raw

    try:
        composed = compose_conf(conf, overrides or [])
        validate_raw(composed)
    except QuantbuildError as err:
        _fail(err)
    out.write_text(yaml.safe_dump(composed, sort_keys=False))
    typer.echo(f"wrote {out}")


@app.command()
def verify(path: Path, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Re-hash a bundle against its manifest and compare the runtime it was validated on."""
    from quantbuild.verify import verify as verify_bundle

    result = verify_bundle(path)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        for problem in result.problems:
            typer.echo(f"integrity: {problem}", err=True)
        for key, old, new in result.drifted:
            typer.echo(f"drift: {key}: {old} -> {new}", err=True)
        if result.drifted and not result.problems:
            typer.echo("the runtime differs from the one this bundle was validated on: run `dvc repro` to revalidate",
                       err=True)
        if result.exit_code == 0:
            typer.echo(f"ok: {path} matches its manifest and this runtime")
    raise typer.Exit(result.exit_code)


@app.command()
def summary(params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Print the release summary: variant chosen, size, key scores, package path."""
    from quantbuild.config import load_config
    from quantbuild.report import release_summary

    try:
        typer.echo(release_summary(load_config(params)))
    except QuantbuildError as err:
        _fail(err)


@app.command()
def compare(
    left: str = typer.Argument(..., help="a variant name, 'baseline', or a bundle folder"),
    right: str = typer.Argument(..., help="a variant name, 'baseline', or a bundle folder"),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    """Side-by-side metrics of two variants (or two released bundles) and their gate outcome."""
    from quantbuild.config import load_config
    from quantbuild.report import compare as compare_metrics

    try:
        typer.echo(compare_metrics(left, right, load_config(params)))
    except QuantbuildError as err:
        _fail(err)


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


def main() -> None:
    app()
