"""verify: every tamper case is exit 1 with the file named; runtime drift is exit 2."""

import json
import os
import shutil

import pytest

from quantbuild.fingerprint import fingerprints
from quantbuild.manifest import MANIFEST
from quantbuild.packaging import build_bundle
from quantbuild.verify import verify

LINEAGE = {
    "model": {"name": "m", "source": "path", "location": "x", "revision": None, "files": {}},
    "variant": {"variant": "v", "method": "gptq", "parameters": {"bits": 4, "group_size": 64}, "libraries": {"gptqmodel": "7.6.0"},
                "bits_per_weight": 4.4},
    "calibration": {"digest": "d" * 64},
    "evaluation": {"baseline": {"perplexity": 2.0, "families": {"structured": {"score": 1.0}}},
                   "variant": {"perplexity": 2.1, "kld_mean": 0.01, "kld_p99": 0.1, "top1_agreement": 0.95,
                               "families": {"structured": {"score": 1.0}}}},
    "git": {"commit": "c" * 40, "dirty": False},
}


@pytest.fixture
def bundle(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    (model / "config.json").write_text('{"a": 1}')
    lineage = dict(LINEAGE, fingerprints=fingerprints())
    build_bundle(tmp_path / "package", "m-v", model, lineage)
    return tmp_path / "package" / "m-v"


def test_fresh_bundle_verifies(bundle):
    result = verify(bundle)
    assert result.exit_code == 0, result.problems
    assert (bundle / "README.md").read_text().startswith("# m-v")


def flip_byte(bundle):
    path = bundle / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["config.json"]["sha256"] = "0" * 64
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def escape_manifest(bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["../outside"] = {"sha256": "0" * 64, "size": 1}
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def unknown_schema(bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["schema"] = "quantbuild.manifest/v99"
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def symlink_out(bundle):
    (bundle / "config.json").unlink()
    (bundle / "config.json").symlink_to("/etc/hostname")


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (flip_byte, "model.safetensors: sha256 mismatch"),
        (lambda b: (b / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:100]),
         "model.safetensors: sha256 mismatch"),
        (lambda b: (b / "config.json").unlink(), "config.json: missing"),
        (lambda b: (b / "extra.bin").write_bytes(b"x"), "extra.bin: extra file not in the manifest"),
        (edit_manifest, "config.json: sha256 mismatch"),
        (escape_manifest, "escapes the bundle"),
        (unknown_schema, "unknown manifest schema 'quantbuild.manifest/v99'"),
        (symlink_out, "config.json: is a symlink"),
        (lambda b: (b / MANIFEST).unlink(), "no manifest.json"),
    ],
)
def test_tamper_is_an_integrity_failure(bundle, tamper, message):
    tamper(bundle)
    result = verify(bundle)
    assert result.exit_code == 1
    assert any(message in problem for problem in result.problems), result.problems


def test_missing_bundle(tmp_path):
    result = verify(tmp_path / "nope")
    assert result.exit_code == 1 and "bundle folder not found" in result.problems[0]


def test_runtime_drift_is_exit_2_naming_the_key(bundle):
    runtime = fingerprints()["runtime"]
    installed = runtime["packages"]["gptqmodel"]
    runtime["packages"]["gptqmodel"] = "9.9.9"
    result = verify(bundle, current_runtime=runtime)
    assert result.exit_code == 2
    assert result.as_dict()["drift"] == [{"key": "packages.gptqmodel", "recorded": installed, "current": "9.9.9"}]


def test_cli_exit_codes_and_json(bundle):
    from typer.testing import CliRunner

    from quantbuild.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(bundle), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["status"] == "ok"
    shutil.copy(bundle / "config.json", bundle / "copy.json")
    bad = runner.invoke(app, ["verify", str(bundle)])
    assert bad.exit_code == 1 and "copy.json: extra file" in bad.output
