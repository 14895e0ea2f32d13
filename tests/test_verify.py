"""verify: every tamper case is exit 1 with the file named; runtime drift is exit 2;
signatures (OpenSSF model-signing, EC keys) and the in-toto provenance statement."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO
from quantbuild.fingerprint import fingerprints
from quantbuild.hashing import sha256_file
from quantbuild.release.manifest import MANIFEST
from quantbuild.release.packaging import build_bundle
from quantbuild.release.provenance import PREDICATE_TYPE, PROVENANCE, STATEMENT_TYPE
from quantbuild.release.signing import SIGNATURE, generate_keypair
from quantbuild.release.verify import verify

LINEAGE = {
    "model": {"name": "m", "source": "path", "location": "x", "revision": None, "files": {"model.safetensors": "b" * 64}},
    "variant": {"variant": "v", "method": "gptq", "parameters": {"bits": 4, "group_size": 64}, "libraries": {"gptqmodel": "7.6.0"},
                "bits_per_weight": 4.4, "files": {}},
    "calibration": {"digest": "d" * 64, "composition": {"tool_calls": {"samples": 4}}, "samples": 4, "seq_len": 64,
                    "seed": 0},
    "params": {"seed": 0, "quant": {"variants": {"v": {"method": "gptq"}}}},
    "dvc_lock": {},
    "evaluation": {"baseline": {"perplexity": 2.0, "families": {"structured": {"score": 1.0}}},
                   "variant": {"perplexity": 2.1, "kld_mean": 0.01, "kld_p99": 0.1, "top1_agreement": 0.95,
                               "families": {"structured": {"score": 1.0}}}},
    "git": {"commit": "c" * 40, "dirty": False},
}


def make_bundle(root, signing_key=None, prints=None):
    model = root / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    (model / "config.json").write_text('{"a": 1}')
    lineage = dict(LINEAGE, fingerprints=prints or fingerprints())
    build_bundle(root / "package", "m-v", model, lineage, signing_key)
    return root / "package" / "m-v"


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder / "a.key", folder / "a.pub")
    generate_keypair(folder / "b.key", folder / "b.pub")
    return folder


@pytest.fixture
def signed(tmp_path, keys):
    return make_bundle(tmp_path, keys / "a.key")


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
    manifest["schema"] = "quantbuild.release.manifest/v99"
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
        (unknown_schema, "unknown manifest schema 'quantbuild.release.manifest/v99'"),
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


def test_a_bundle_validated_on_a_torch_runtime_verifies_with_its_own_device_and_kernels(tmp_path):
    """The bundle's torch settings (device, kernels) are compared as recorded; the machine
    and libraries are what verify measures now."""
    from quantbuild.config import EvalConfig
    from quantbuild.runtimes import torch_runtime

    settings = torch_runtime(EvalConfig(runtime="kernel"), "cpu")
    bundle = make_bundle(tmp_path, prints=fingerprints(settings))
    assert verify(bundle).exit_code == 0
    drifted = fingerprints(settings)["runtime"]
    drifted["device"]["gpu"] = [{"name": "NVIDIA H200", "compute_capability": "9.0", "driver": "580.159.04"}]
    result = verify(bundle, current_runtime=drifted)
    assert result.exit_code == 2 and [entry["key"] for entry in result.as_dict()["drift"]] == ["device.gpu"]


def test_cli_exit_codes_and_json(bundle):
    from typer.testing import CliRunner

    from quantbuild.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(bundle), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["status"] == "ok"
    shutil.copy(bundle / "config.json", bundle / "copy.json")
    bad = runner.invoke(app, ["verify", str(bundle)])
    assert bad.exit_code == 1 and "copy.json: extra file" in bad.output


def test_provenance_is_an_intoto_statement_with_slsa_provenance(bundle):
    statement = json.loads((bundle / PROVENANCE).read_text())
    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    subjects = {subject["name"]: subject["digest"]["sha256"] for subject in statement["subject"]}
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert subjects == {name: entry["sha256"] for name, entry in manifest["files"].items() if name != PROVENANCE}
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["params"] == LINEAGE["params"]
    names = {dependency["name"] for dependency in definition["resolvedDependencies"]}
    assert {"baseline/model.safetensors", "calibration", "pypi/gptqmodel", "source"} <= names
    assert statement["predicate"]["runDetails"]["builder"]["id"].startswith("urn:quantbuild:builder:sha256:")


def test_signed_bundle_verifies_with_its_public_key(signed, keys):
    assert (signed / SIGNATURE).is_file()
    result = verify(signed, public_key=keys / "a.pub")
    assert result.exit_code == 0, result.problems


def _resign_with(bundle, key):
    from quantbuild.release.signing import sign_bundle

    (bundle / SIGNATURE).unlink()
    sign_bundle(bundle, key)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda b, k: _resign_with(b, k / "b.key"), "model.sig: does not verify with"),
        (lambda b, k: (b / SIGNATURE).unlink(), "model.sig: missing (the manifest says the bundle is signed)"),
        (lambda b, k: flip_byte(b), "model.sig: does not verify with"),
        (lambda b, k: (b / SIGNATURE).write_bytes(b"{}"), "model.sig: does not verify with"),
    ],
)
def test_signature_tampering_is_an_integrity_failure(signed, keys, tamper, message):
    tamper(signed, keys)
    result = verify(signed, public_key=keys / "a.pub")
    assert result.exit_code == 1
    assert any(message in problem for problem in result.problems), result.problems


def test_a_signed_bundle_changed_with_its_manifest_names_the_file_in_one_short_line(signed, keys):
    """An attacker rewrites a file and its manifest entry to match: the manifest check passes,
    the signature does not, and the line names the file (the library's whole message is in
    --json's details)."""
    (signed / "config.json").write_text('{"a": 2}')
    manifest = json.loads((signed / MANIFEST).read_text())
    manifest["files"]["config.json"]["sha256"] = sha256_file(signed / "config.json")
    (signed / MANIFEST).write_text(json.dumps(manifest))
    result = verify(signed, public_key=keys / "a.pub")
    assert result.exit_code == 1 and len(result.problems) == 1, result.problems
    line = result.problems[0]
    assert line.startswith("model.sig: does not verify with") and "config.json: differs from the signed file" in line
    assert "(and 1 more: --json)" in line and len(line) < 200, line  # manifest.json changed too
    assert any("Hash mismatch" in detail for detail in result.as_dict()["details"])


def test_a_manifest_file_name_with_a_control_character_is_one_line(bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["config\u0000.json"] = manifest["files"].pop("config.json")
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    result = verify(bundle)
    assert result.exit_code == 1 and result.problems == ["manifest path 'config\\x00.json' holds a control character"]


def test_signed_bundle_checked_with_another_key_or_none_fails(signed, keys):
    other = verify(signed, public_key=keys / "b.pub")
    assert other.exit_code == 1 and any("not the key the manifest names" in p for p in other.problems)
    none = verify(signed)
    assert none.exit_code == 1 and "no public key was given" in none.problems[0]
    # the project's own key, not named by the user, on a bundle signed elsewhere: the signer is unknown here
    elsewhere = verify(signed, public_key=keys / "b.pub", key_named=False)
    assert elsewhere.exit_code == 1 and elsewhere.problems == [
        "model.sig: signed by a key this project does not hold (public key sha256 "
        f"{json.loads((signed / MANIFEST).read_text())['signing']['public_key_sha256'][:16]}...): check it with "
        "--public-key and the signer's key"]


def test_stray_signature_on_an_unsigned_bundle_is_extra(bundle):
    (bundle / SIGNATURE).write_bytes(b"{}")
    result = verify(bundle)
    assert result.exit_code == 1 and "model.sig: extra file not in the manifest" in result.problems[0]


def test_another_releases_manifest_is_an_integrity_failure(bundle, tmp_path):
    other = make_bundle(tmp_path / "other")
    shutil.copy(other / MANIFEST, bundle / MANIFEST)
    result = verify(bundle)
    assert result.exit_code == 1
    assert any("model.safetensors: sha256 mismatch" in problem for problem in result.problems)


def test_keygen_refuses_to_overwrite_and_key_is_private(keys):
    from quantbuild.errors import ConfigError

    assert oct((keys / "a.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(keys / "a.key", keys / "c.pub")


def test_lineage_json_checks_each_link(bundle):
    from typer.testing import CliRunner

    from quantbuild.cli import app

    result = CliRunner().invoke(app, ["lineage", str(bundle), "--json"])
    tree = json.loads(result.output)
    assert tree["link"] == "package" and tree["status"] == "ok"
    links = {link["link"]: link for link in tree["children"]}
    assert set(links) == {"quantized weights", "baseline", "calibration set", "params", "fingerprints", "behaviour",
                          "dvc.lock", "commit"}
    assert links["behaviour"]["status"] == "not checked"  # this bundle carries no probes
    assert links["calibration set"]["facts"]["digest"] == "d" * 64
    assert links["commit"]["status"] == "differs"  # the fake commit is not in this repository
    assert result.exit_code == 1


def test_lineage_text_is_compact_and_a_dirty_build_is_a_warning_not_ok(bundle):
    from typer.testing import CliRunner

    from quantbuild.cli import app
    from quantbuild.release.manifest import MANIFEST

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["git"] = {"commit": head, "dirty": True}
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    tree = json.loads(CliRunner().invoke(app, ["lineage", str(bundle), "--json"]).output)
    commit = next(link for link in tree["children"] if link["link"] == "commit")
    assert commit["status"] == "warning" and "uncommitted changes" in commit["detail"]
    text = CliRunner().invoke(app, ["lineage", str(bundle)]).output
    assert len(text.splitlines()) <= 2 * (len(tree["children"]) + 1), text
    assert "commit warning" in text and "{" not in text


def test_lineage_of_a_missing_bundle_or_one_without_manifest_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from quantbuild.cli import app

    missing = CliRunner().invoke(app, ["lineage", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "bundle folder not found" in missing.output
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(app, ["lineage", str(tmp_path / "empty")])
    assert empty.exit_code == 1 and "no manifest.json (not a quantbuild bundle)" in empty.output


def test_a_signed_bundle_cannot_be_downgraded_to_unsigned(signed, keys):
    """Weights changed, manifest digests updated, signature and signing record removed."""
    from quantbuild.hashing import sha256_file

    flip_byte(signed)
    manifest = json.loads((signed / MANIFEST).read_text())
    manifest["files"]["model.safetensors"]["sha256"] = sha256_file(signed / "model.safetensors")
    del manifest["signing"]
    (signed / MANIFEST).write_text(json.dumps(manifest))
    (signed / SIGNATURE).unlink()
    result = verify(signed, public_key=keys / "a.pub")
    assert result.exit_code == 1
    assert result.problems == [f"{MANIFEST}: the bundle is not signed, and a public key ({keys / 'a.pub'}) was given: "
                               f"an unsigned bundle cannot verify against a key"]


def test_a_fifo_inside_the_bundle_is_not_a_regular_file(bundle):
    os.mkfifo(bundle / "pipe")
    result = verify(bundle)
    assert result.exit_code == 1 and result.problems == ["pipe: not a regular file (a bundle holds regular files only)"]


def test_a_manifest_reached_through_a_symlink_is_refused(bundle, tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    shutil.move(bundle / MANIFEST, elsewhere)
    (bundle / MANIFEST).symlink_to(elsewhere)
    result = verify(bundle)
    assert result.exit_code == 1 and "is a symlink" in result.problems[0]


def test_duplicate_keys_and_wrong_types_in_the_manifest_are_one_line(bundle):
    text = (bundle / MANIFEST).read_text()
    (bundle / MANIFEST).write_text(text.replace('"files": {', '"files": {"config.json": {"sha256": "' + "0" * 64
                                                + '", "size": 1}, ', 1))
    result = verify(bundle)
    assert result.exit_code == 1 and "duplicate key 'config.json'" in result.problems[0]
    manifest = json.loads(text)
    manifest["files"]["config.json"]["size"] = "big"
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    result = verify(bundle)
    assert result.problems == [f"{bundle / MANIFEST}: files.config.json must be "
                               '{"sha256": 64 hex digits, "size": an integer}']
    manifest["files"]["config.json"]["size"] = 8
    manifest["signing"] = "yes"
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    assert verify(bundle).problems == [f"{bundle / MANIFEST}: signing must be a JSON object"]


def test_the_dirty_tree_message_names_the_whole_file(tmp_path):
    import subprocess

    from quantbuild.errors import QuantbuildError
    from quantbuild.release.registry import require_clean

    for command in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"]):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "x"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("a: 2\n")
    with pytest.raises(QuantbuildError, match=r"uncommitted changes \(params\.yaml\)"):
        require_clean(tmp_path, "release")


def test_probes_recorded_on_a_gpu_are_drift_on_a_machine_without_one(tmp_path):
    """verify --behaviour reloads a torch bundle on the device its probes were recorded on;
    without that device it is runtime drift (exit 2) naming it, not a crash."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import BASELINE
    from quantbuild import behaviour
    from quantbuild.hashing import read_json, write_json
    from quantbuild.release.verify import VerifyResult, verify_behaviour
    from quantbuild.runtimes.torch_stack import TorchRuntime

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))
    model = AutoModelForCausalLM.from_pretrained(str(BASELINE), dtype=torch.float32).eval()
    behaviour.record(TorchRuntime(model, tokenizer, kernels={"gptq": "gptq_triton"}), tmp_path / "probes")
    # as a GPU evaluation records them: on cuda:0
    info = read_json(tmp_path / "probes" / behaviour.BEHAVIOUR)
    write_json(tmp_path / "probes" / behaviour.BEHAVIOUR, {**info, "device": "cuda:0"})
    result = VerifyResult(bundle=str(tmp_path))
    assert verify_behaviour(result, BASELINE, tmp_path / "probes") == {}
    assert result.exit_code == 2 and result.problems == []
    assert result.drifted == [("runtime: the probes' device", "cuda:0", "cpu (torch sees no CUDA GPU here)")]
