"""The Hydra schema, the committed params.yaml, and one-line errors for bad values."""

import copy
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import BASELINE, REPO, committed, committed_conf
from quantbuild.config import AwqConfig, BnbConfig, GptqConfig, MixedConfig, RtnConfig, compose
from quantbuild.runtimes import ladder_runtime
from quantbuild.validation import load_config, validate_raw
from quantbuild.errors import ConfigError
from quantbuild.quantizers import check_against_model, uniform_plan


def test_params_yaml_is_the_composition_of_conf(tmp_path):
    """As committed: a user's working params.yaml (their keys, an experiment) is theirs."""
    composed = compose(committed_conf(tmp_path))
    assert composed == yaml.safe_load(committed("params.yaml")), \
        "params.yaml is out of sync with conf/: run `quantbuild compose`"


@pytest.fixture(scope="module")
def gpu_params() -> dict:
    """params.yaml as `dvc exp run -S quant=gpu -S 'eval.targets=[torch-cpu]'` composes it: the
    GPTQ/AWQ/bnb ladder on the torch stack."""
    return compose(REPO / "conf", ["quant=gpu", "eval.targets=[torch-cpu]"])


def test_committed_params_validate():
    config = validate_raw(yaml.safe_load(committed("params.yaml")))
    assert list(config.quant.variants) == ["gguf_f16", "gguf_q8_0", "gguf_q6_k", "gguf_q4_k_m_imat", "gguf_iq4_xs_imat", "gguf_mix_3p5"]


def test_gpu_ladder_validates_with_one_typed_config_per_method(gpu_params):
    variants = validate_raw(gpu_params).quant.variants
    assert list(variants) == ["rtn_int8", "gptq_4bit_g128", "gptq_4bit_g32", "awq_4bit_g128", "bnb_nf4",
                              "mixed_auto_3p5", "gptq_3bit_g64"]
    assert [type(variant) for variant in variants.values()] == [RtnConfig, GptqConfig, GptqConfig, AwqConfig,
                                                                BnbConfig, MixedConfig, GptqConfig]


def test_group_override_selects_variants():
    composed = compose(REPO / "conf", ["quant=[rtn_4bit_g64,gptq_3bit_g64]", "gate=impossible"])
    assert list(composed["quant"]["variants"]) == ["rtn_4bit_g64", "gptq_3bit_g64"]
    assert composed["gate"]["max_kld_mean"] == 0.0


def _edit(params: dict, dotted: str, value) -> dict:
    edited = copy.deepcopy(params)
    node = edited
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return edited


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("calibration.samples", "many", "calibration.samples"),
        ("eval.colour", "blue", "eval.colour"),
        ("quant.variants.gguf_q4_k_m_imat.type", "Q9_K", "quant.variants.gguf_q4_k_m_imat.type='Q9_K' is not a llama.cpp type"),
        ("quant.variants.gguf_q8_0.method", "magic",
         "method='magic' is not allowed (allowed: awq | bnb | dense | gguf | gptq | mixed | rtn)"),
        ("quant.variants.gguf_q4_k_m_imat.bits", 4,
         "quant.variants.gguf_q4_k_m_imat.bits is not a key of method gguf (a key of awq | bnb | dense | gptq | mixed | rtn;"),
        ("quant.variants.gguf_mix_3p5.validation_tokens", 100,
         "quant.variants.gguf_mix_3p5.validation_tokens=100 is not allowed (allowed: 0 = off, or >= 1024"),
        ("model.source", "ftp", "model.source='ftp' is not allowed (allowed: path | hf)"),
        ("gate.min_top1_agreement", 1.5, "gate.min_top1_agreement=1.5"),
        ("gate.max_family_drop", {"poetry": 0.1}, "gate.max_family_drop.poetry"),
        ("gate.must_not_degrade", ["poetry"], "or golden families named in eval.golden"),
        ("eval.golden", {"structured": "data/golden/x.jsonl"}, "eval.golden.structured='structured' is not allowed "
                                                               "(allowed: a new family name"),
        ("eval.golden", {"mine": "data/eval/reasoning.jsonl"}, "eval.golden.mine='data/eval/reasoning.jsonl' is not "
                                                               "allowed (allowed: a .jsonl file inside data/golden/"),
        ("eval.golden", {"mine": "data/golden/absent.jsonl"}, "(allowed: an existing file)"),
        ("eval.families", ["language_modelling", "poetry"], "eval.families='poetry'"),
        ("eval.runtime", "gpu", "eval.runtime='gpu'"),
        ("eval.targets", ["llama.cpp-tpu"], "eval.targets='llama.cpp-tpu' is not allowed (allowed: llama.cpp-cpu | "
                                            "llama.cpp-cuda | torch-cpu | torch-cuda)"),
        ("eval.targets", [], "eval.targets=[] is not allowed (allowed: at least one deploy target)"),
        ("eval.targets", ["llama.cpp-cpu", "llama.cpp-cpu"], "(allowed: each target once)"),
        ("eval.targets", ["torch-cpu"], "eval.targets: torch-cpu does not run this ladder, which deploys on llama.cpp "
                                        "(allowed: llama.cpp-cpu | llama.cpp-cuda)"),
        ("eval.gpu_kernels", {"gguf": "gguf_triton"}, "eval.gpu_kernels='gguf' is not allowed (allowed: gptq | awq)"),
        ("eval.gpu_kernels", {"gptq": "awq_gemm_triton"}, "eval.gpu_kernels.gptq='awq_gemm_triton' is not allowed"),
        ("gate.memory_context", 333, "gate.memory_context=333 is not allowed (allowed: one of eval.memory.context_lengths"),
        ("eval.memory.budget_mb", -1, "eval.memory.budget_mb=-1"),
        ("eval.latency.max_rounds", 10,
         "eval.latency.max_rounds=10 is not allowed (allowed: eval.latency.repeats (15) .. 10000"),
        ("eval.latency.max_rounds", "many", "eval.latency.max_rounds"),
        ("eval.threads", -1, "eval.threads=-1 is not allowed (allowed: >= 0 (0 = the cores free"),
        ("calibration.sources", {"tool_calls": 0}, "calibration.sources.tool_calls=0"),
        ("calibration.sensitivity.measure", "hessian",
         "calibration.sensitivity.measure='hessian' is not allowed (allowed: auto | kl | weight_error)"),
        ("calibration.sensitivity.auto_weight_error_params", -1, "calibration.sensitivity.auto_weight_error_params=-1"),
        ("calibration.sensitivity.row_stride", 0,
         "calibration.sensitivity.row_stride=0 is not allowed (allowed: 1..64 (1 = every row))"),
        ("calibration.sensitivity.sample_rows_params", -5, "calibration.sensitivity.sample_rows_params=-5"),
        ("calibration.sensitivity.check_stretches", 65,
         "calibration.sensitivity.check_stretches=65 is not allowed (allowed: 0..64"),
        ("eval.sequential.z", 1.5, "eval.sequential.z=1.5 is not allowed (allowed: 1.96 .. 10)"),
        ("eval.sequential.looks", [100, 0], "eval.sequential.looks=[100, 0] is not allowed (allowed: positive item"),
        ("calibration.sources", {"tool_calls": float("inf")}, "calibration.sources.tool_calls=inf is not allowed"),
        ("calibration.sources", {"../../etc/passwd": 1.0}, "calibration.sources.'../../etc/passwd'"),
        ("model.files", {"../outside.json": "a" * 64}, "model.files.'../outside.json'='../outside.json' is not allowed"),
        ("model.files", {"/etc/passwd": "a" * 64}, "model.files.'/etc/passwd'"),
        ("model.files", {"con\x00fig.json": "a" * 64}, "no '..', no absolute path, no backslash or NUL"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(params, key, value, message):
    with pytest.raises(ConfigError) as err:
        validate_raw(_edit(params, key, value))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("quant.variants.gptq_4bit_g128.bits", 5, "bits=5 is not supported by gptq (allowed: 2, 3, 4, 8)"),
        ("quant.variants.rtn_int8.group_size", 48, "group_size=48 is not supported by rtn"),
        ("quant.variants.rtn_int8.method", "magic",
         "method='magic' is not allowed (allowed: awq | bnb | dense | gguf | gptq | mixed | rtn)"),
        # A key of another method: refused by the variant's own schema, naming the method that has it.
        ("quant.variants.gptq_4bit_g128.quant_type", "nf4",
         "quant.variants.gptq_4bit_g128.quant_type is not a key of method gptq (a key of bnb; gptq takes: "),
        ("quant.variants.gptq_4bit_g128.overrides", [{"pattern": "x"}],
         "quant.variants.gptq_4bit_g128.overrides is not a key of method gptq (a key of gguf | mixed;"),
        ("quant.variants.mixed_auto_3p5.target_bpw", 3.5,
         "quant.variants.mixed_auto_3p5.target_bpw is not a key of method mixed (a key of gguf;"),
        ("quant.variants.awq_4bit_g128.desc_act", True,
         "quant.variants.awq_4bit_g128.desc_act is not a key of method awq (a key of gptq | mixed;"),
        ("quant.variants.bnb_nf4.colour", "blue",
         "quant.variants.bnb_nf4.colour is not a key of method bnb (no method has it;"),
    ],
)
def test_bad_gpu_variant_values_are_one_line_errors_naming_the_key(gpu_params, key, value, message):
    with pytest.raises(ConfigError) as err:
        validate_raw(_edit(gpu_params, key, value))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_ladder_may_not_mix_runtimes(params, gpu_params):
    gptq = gpu_params["quant"]["variants"]["gptq_4bit_g128"]
    with pytest.raises(ConfigError) as err:
        validate_raw(_edit(params, "quant.variants.gptq_4bit_g128", gptq))
    assert "quant.variants: gguf_f16 deploys on llama.cpp but gptq_4bit_g128 on torch" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("variant", "target", "message"), [
    ("gptq_3bit_g64", "vllm", "quant.variants.gptq_3bit_g64.target='vllm' cannot load it: vLLM's GPTQ kernels take "
                              "bits 4 or 8, this variant has bits=3"),
    ("mixed_auto_3p5", "vllm", "quant.variants.mixed_auto_3p5.target='vllm' cannot load the mixed format "
                               "(allowed for mixed: gptqmodel)"),
    ("bnb_nf4", "llama.cpp", "quant.variants.bnb_nf4.target='llama.cpp' cannot load the bnb format"),
    ("gptq_4bit_g128", "tensorrt", "quant.variants.gptq_4bit_g128.target='tensorrt' cannot load the gptq format"),
])
def test_a_format_its_target_cannot_load_is_refused_at_config_time(gpu_params, variant, target, message):
    with pytest.raises(ConfigError) as err:
        validate_raw(_edit(gpu_params, f"quant.variants.{variant}.target", target))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unavailable_target_stops_the_first_stage_in_one_line_before_any_work(gpu_params, tmp_path):
    import subprocess
    import sys

    edited = _edit(gpu_params, "quant.variants", {"gptq_4bit_g128": {**gpu_params["quant"]["variants"]["gptq_4bit_g128"],
                                                                     "target": "vllm"}})
    edited["paths"] = {**edited["paths"], "fingerprint": str(tmp_path / "fingerprint")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited))
    result = subprocess.run([sys.executable, "-m", "stages.fingerprint"], cwd=tmp_path, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": f"{REPO}{__import__('os').pathsep}"
                                 f"{__import__('os').environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "quantbuild: target vllm: not available here (it needs a CUDA GPU; this machine has none)"]
    assert not (tmp_path / "fingerprint").exists()


def test_eval_on_cuda_without_a_gpu_stops_the_first_stage_in_one_line_before_any_work(gpu_params, tmp_path):
    import os
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    edited = _edit(gpu_params, "eval.targets", ["torch-cuda"])
    edited["paths"] = {**edited["paths"], "fingerprint": str(tmp_path / "fingerprint")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited))
    result = subprocess.run([sys.executable, "-m", "stages.fingerprint"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "quantbuild: target torch-cuda: not available here (torch sees no CUDA GPU; validate for torch-cpu, or run "
        "on a machine with one)"]
    assert not (tmp_path / "fingerprint").exists()


def test_the_gpu_presets_measure_every_suite_on_cuda_kernels():
    config = validate_raw(compose(REPO / "conf", ["quant=cuda", "eval=gpu"]))
    assert list(config.quant.variants) == ["dense_f16", "bnb_int8", "gptq_4bit_g128", "awq_4bit_g128", "bnb_nf4"]
    # the higher-precision format the gate keeps when nothing wins, on the same runtime
    assert ladder_runtime(config) == "torch" and config.quant.variants["dense_f16"].dtype == "float16"
    assert (config.eval.targets, config.eval.runtime, config.eval.latency.runtime) == (["torch-cuda"], "kernel", "kernel")
    assert config.eval.gpu_kernels == {"gptq": "gptq_triton", "awq": "awq_gemm_triton"}
    # everything else is the default evaluation
    default = validate_raw(compose(REPO / "conf", []))
    assert (config.eval.families, config.eval.limit, config.eval.latency.repeats) == \
        (default.eval.families, default.eval.limit, default.eval.latency.repeats)


def test_group_size_must_divide_every_layer_width(gpu_params):
    variant = validate_raw(gpu_params).quant.variants["gptq_4bit_g128"]
    layers = {"model.layers.0.mlp.down_proj": (256, 768)}
    plan = uniform_plan("quant.variants.x", variant, layers, None, BASELINE)
    check_against_model("quant.variants.x", variant, BASELINE, plan, layers)
    layers = {"model.layers.0.mlp.down_proj": (256, 704)}
    with pytest.raises(ConfigError, match="group_size=128 does not divide model.layers.0.mlp.down_proj input width 704"):
        check_against_model("quant.variants.x", variant, BASELINE, plan, layers)


def test_a_stage_exits_non_zero_with_one_line_on_bad_params(tmp_path, gpu_params):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_edit(gpu_params, "quant.variants.gptq_4bit_g128.bits", 7)))
    result = subprocess.run([sys.executable, "-m", "stages.fingerprint"], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "quantbuild: params.yaml: quant.variants.gptq_4bit_g128.bits=7 is not supported by gptq (allowed: 2, 3, 4, 8)"
    ]
    assert not (tmp_path / "artifacts").exists()


def test_missing_and_malformed_params(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "params.yaml")


def test_dvc_hydra_composition_finds_the_schema_through_the_plugin(tmp_path):
    """What `dvc exp run -S quant=...` does: DVC composes conf/ with the repo's hydra_plugins."""
    code = (
        "import sys; from dvc.utils.hydra import compose_and_dump; "
        f"compose_and_dump(sys.argv[1], {str(REPO / 'conf')!r}, None, 'config', {str(REPO)!r}, sys.argv[2:])"
    )
    out = tmp_path / "params.yaml"
    subprocess.run([sys.executable, "-c", code, str(out), "quant=[rtn_4bit_g64,gptq_3bit_g64]",
                    "eval.targets=[torch-cpu]"], check=True, cwd=tmp_path)
    composed = yaml.safe_load(out.read_text())
    assert list(composed["quant"]["variants"]) == ["rtn_4bit_g64", "gptq_3bit_g64"]
    assert composed["eval"]["targets"] == ["torch-cpu"]
    assert composed["paths"]["baseline"] == "artifacts/baseline"  # defaults come from the dataclass schema
    validate_raw(composed)


def test_an_unknown_group_option_in_compose_is_one_line():
    from typer.testing import CliRunner

    from quantbuild.cli import app

    result = CliRunner().invoke(app, ["compose", "quant=[nope]", "--conf", str(REPO / "conf"), "--out", "/dev/null"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"quantbuild: {REPO / 'conf'}: In 'config': Could not load 'quant/nope'."]


def test_compose_keeps_earlier_overrides_says_what_changed_and_resets_on_request(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from quantbuild.cli import app

    out = tmp_path / "params.yaml"

    def compose(*args: str) -> list[str]:
        result = CliRunner().invoke(app, ["compose", *args, "--conf", str(REPO / "conf"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        return result.output.strip().splitlines()

    def samples() -> int:
        return yaml.safe_load(out.read_text())["calibration"]["sensitivity"]["samples"]

    compose()
    default = samples()
    assert compose("calibration.sensitivity.samples=1") == [
        f"wrote {out}", f"  calibration.sensitivity.samples: {default} -> 1"]
    # a later compose for another key keeps it, and says so
    lines = compose("eval.limit=7")
    assert lines[0] == f"wrote {out} (kept earlier overrides: calibration.sensitivity.samples=1; --reset drops them)"
    assert len(lines) == 2 and lines[1].startswith("  eval.limit: ") and lines[1].endswith(" -> 7")
    assert samples() == 1 and yaml.safe_load(out.read_text())["eval"]["limit"] == 7
    # the same key again replaces it; --reset goes back to conf/ alone
    compose("calibration.sensitivity.samples=2")
    assert samples() == 2 and yaml.safe_load(out.read_text())["eval"]["limit"] == 7
    compose("--reset")
    assert samples() == default and not out.read_text().startswith("#")
    # a failed compose leaves the file and its recorded overrides as they were
    compose("eval.limit=9")
    before = out.read_text()
    failed = CliRunner().invoke(app, ["compose", "quant=[nope]", "--conf", str(REPO / "conf"), "--out", str(out)])
    assert failed.exit_code == 1 and out.read_text() == before


def test_a_golden_family_is_budgeted_like_any_family(params, tmp_path, monkeypatch):
    """Two golden files, two families named by the user: each takes a budget or the
    must-not-degrade rule, as the generated families do."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "golden").mkdir(parents=True)
    for name in ("support", "billing"):
        shutil.copy(REPO / "data" / "eval" / "reasoning.jsonl", tmp_path / "data" / "golden" / f"{name}.jsonl")
    edited = _edit(params, "eval.golden", {"support": "data/golden/support.jsonl", "billing": "data/golden/billing.jsonl"})
    edited = _edit(edited, "gate.max_family_drop", {**params["gate"]["max_family_drop"], "support": 0.02})
    edited = _edit(edited, "gate.must_not_degrade", [*params["gate"]["must_not_degrade"], "billing"])
    validate_raw(edited)
