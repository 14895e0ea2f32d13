"""The bundled baseline: pinned, loadable with the Auto classes, and genuinely able."""

import json

import pytest
import yaml

from conftest import BASELINE, REPO
from quantbuild.hashing import digest_tree
from quantbuild.runtimes.torch_stack import TorchRuntime
from quantbuild.tasks.items import load_items


CHAT = REPO / "data" / "baseline" / "workflow-chat-33m"


@pytest.mark.parametrize("preset", ["workflow-llama-8m", "workflow-chat-33m"])
def test_files_match_their_pins(preset):
    pins = yaml.safe_load((REPO / "conf" / "model" / f"{preset}.yaml").read_text())
    assert pins["path"] == f"data/baseline/{preset}"
    assert pins["files"] == digest_tree(REPO / pins["path"])


def test_architecture_limits():
    config = json.loads((BASELINE / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0
    assert config["dtype"] in ("float16", "bfloat16")
    assert (BASELINE / "model.safetensors").stat().st_size <= 16_000_000


@pytest.fixture(scope="module")
def loaded():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))
    model = AutoModelForCausalLM.from_pretrained(str(BASELINE), dtype=torch.float32).eval()
    return model, tokenizer


def test_loads_with_auto_classes(loaded):
    model, tokenizer = loaded
    assert model.num_parameters() <= 8_000_000
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id


# Floors, not exact outputs: a small sample of each family, well below the measured scores
# (data/baseline/workflow-llama-8m/README.md) so noise cannot fail them.
FLOORS = {"structured": 0.75, "retrieval": 0.4, "long_context": 0.75, "reasoning": 0.7}


@pytest.mark.parametrize("family", sorted(FLOORS))
def test_solves_a_sample_of_each_family(loaded, family):
    from quantbuild.evaluation.suites import run_generative

    model, tokenizer = loaded
    items = load_items(REPO / "data" / "eval" / f"{family}.jsonl")[:24]
    records = run_generative(TorchRuntime(model, tokenizer, batch_size=24), items)
    assert sum(record["correct"] for record in records) / len(records) >= FLOORS[family]


# The instruct model through its template on the CPU: samples, floors below its measured
# scores (data/baseline/workflow-chat-33m/README.md: 1.000, 0.987, 0.903, 0.967).
CHAT_FLOORS = {"structured": 0.9, "retrieval": 0.8, "long_context": 0.7, "reasoning": 0.7}


def test_the_instruct_model_answers_through_its_template_and_is_4x(loaded):
    """workflow-chat-33m (issue #25): at least 4x the bundled model's parameters, a chat
    tokenizer the bundled script makes from the bundled tokenizer, and the base bars met when
    prompted through its template (tool calls in <tool_call> tags, retrieval after a search
    turn), on 10 items per family in float32 on the CPU, with no degenerate output."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantbuild.baseline.chat import make_chat_tokenizer
    from quantbuild.evaluation.suites import run_generative
    from quantbuild.prompts import prompt_format

    made = REPO / ".pytest_cache" / "chat-tokenizer"
    make_chat_tokenizer(BASELINE, made)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (made / name).read_bytes() == (CHAT / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(str(CHAT))
    model = AutoModelForCausalLM.from_pretrained(str(CHAT), dtype=torch.float32).eval()
    bundled, _ = loaded
    assert model.num_parameters() >= 4 * bundled.num_parameters()
    fmt = prompt_format(tokenizer.chat_template)
    assert fmt.tool_call_format == "hermes"
    runtime = TorchRuntime(model, tokenizer, batch_size=10)
    for family, floor in CHAT_FLOORS.items():
        items = load_items(REPO / "data" / "eval" / f"{family}.jsonl")[:10]
        records = run_generative(runtime, items, fmt)
        assert sum(record["correct"] for record in records) / len(records) >= floor, family
        assert not any(record.get("degenerate") for record in records), family


def test_the_chat_preset_composes_validates_and_fetches(tmp_path, monkeypatch):
    """`model=workflow-chat-33m` is a whole pipeline config, and fetch checks and copies its
    sharded weights (index and five shards) and its template like any pinned folder."""
    from quantbuild.config import compose
    from quantbuild.validation import validate_raw
    from quantbuild.sources import fetch

    monkeypatch.chdir(REPO)
    config = validate_raw(compose(REPO / "conf", ["model=workflow-chat-33m"]))
    assert config.model.name == "workflow-chat-33m" and config.model.path == "data/baseline/workflow-chat-33m"
    record = fetch(config.model, tmp_path / "baseline")
    assert record["files"] == config.model.files
    assert sum(name.endswith(".safetensors") for name in record["files"]) == 5
    assert all((tmp_path / "baseline" / name).is_file() for name in config.model.files)
    assert "chat_template.jinja" in record["files"]


def test_perplexity_is_low_on_held_out_text(loaded):
    from quantbuild.evaluation.suites import perplexity

    model, tokenizer = loaded
    texts = [item.prompt for item in load_items(REPO / "data" / "eval" / "language_modelling.jsonl")[:16]]
    assert perplexity(TorchRuntime(model, tokenizer, batch_size=16), texts)["perplexity"] < 4.0


def test_training_in_two_pieces_gives_the_weights_of_one_run(tmp_path):
    """A run stopped by --stop-after and resumed from its checkpoint ends with the same
    bytes as the uninterrupted run (CPU); a resume with other settings is one clear error."""
    from quantbuild.baseline.train import STATE, train
    from quantbuild.errors import ConfigError

    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 2,
            "num_key_value_heads": 2, "max_position_embeddings": 64}
    settings = dict(steps=4, batch=2, seq_len=64, lr=1e-3, seed=0, workers=1, architecture=tiny)
    whole = train(BASELINE, tmp_path / "whole", **settings)
    stopped = train(BASELINE, tmp_path / "pieces", **settings, checkpoint=tmp_path / "ckpt", stop_after=1e-9)
    assert stopped == {"stopped_at_step": 1, "steps": 4} and (tmp_path / "ckpt" / STATE).is_file()
    assert not (tmp_path / "pieces").exists()
    with pytest.raises(ConfigError, match="a run with other settings"):
        train(BASELINE, tmp_path / "pieces", **{**settings, "lr": 2e-3}, checkpoint=tmp_path / "ckpt")
    resumed = train(BASELINE, tmp_path / "pieces", **settings, checkpoint=tmp_path / "ckpt")
    assert resumed["resumed"] and [entry["loss"] for entry in resumed["log"]] == [e["loss"] for e in whole["log"]]
    assert (tmp_path / "pieces" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_data_parallel_training_makes_the_one_process_update(tmp_path):
    """torchrun with two processes (gloo on this CPU) splits each step's batch over the ranks
    and normalises the loss over the whole step: the same loss curve and the same weights as
    one process, up to the order of floating-point sums; rank 0 alone writes the model."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    def cli(batch: int) -> list[str]:
        return ["-m", "quantbuild.baseline.train", "--tokenizer", str(BASELINE), "--steps", "4", "--batch", str(batch),
                "--seq-len", "64", "--lr", "1e-3", "--workers", "1", "--hidden", "32", "--layers", "1",
                "--intermediate", "64", "--heads", "2"]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = cli(4)
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two"), "--checkpoint", str(tmp_path / "ckpt")],
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    records = [json.loads((tmp_path / name / "training_record.json").read_text()) for name in ("one", "two")]
    assert [r["processes"] for r in records] == [1, 2]
    assert [e["loss"] for e in records[0]["log"]] == pytest.approx([e["loss"] for e in records[1]["log"]], abs=2e-4)
    weights = [load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor.float(), weights[1][name].float(), atol=2e-3), name
    # an uneven split is refused in one line before any work
    odd = subprocess.run([*torchrun, *cli(3), "--out", str(tmp_path / "odd"), "--checkpoint", str(tmp_path / "ckpt-odd")],
                         capture_output=True, text=True)
    assert odd.returncode != 0 and "needs --checkpoint" in odd.stderr and "divisible by 2 (got 3)" in odd.stderr
    assert not (tmp_path / "odd").exists()


def test_training_mix_overrides_are_checked_and_change_the_data():
    """`--mix retrieval=8` weighs the retrieval family up in the packed rows; an unknown family,
    a weight that is not positive, or a malformed pair is one clear error."""
    import subprocess
    import sys

    from quantbuild.baseline.train import MIX, build_rows, parse_mix, training_mix
    from quantbuild.errors import ConfigError

    assert training_mix(None) == MIX
    assert training_mix(parse_mix(["retrieval=8"])) == {**MIX, "retrieval": 8.0}
    for bad, message in ((["retrival=8"], "unknown task family 'retrival'"), (["retrieval=0"], "must be a positive"),
                         (["retrieval=nan"], "must be a positive")):
        with pytest.raises(ConfigError, match=message):
            training_mix(parse_mix(bad))
    with pytest.raises(ConfigError, match="expected FAMILY=WEIGHT"):
        parse_mix(["retrieval:8"])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))

    def documents_per_row(mix):
        rows, _ = build_rows(str(BASELINE), seed=0, total_rows=16, seq_len=256, workers=1, mix=mix)
        return sum(tokenizer.decode(row.long()).count("Documents:") for row in rows)

    assert documents_per_row({**MIX, "retrieval": 50.0}) > 1.5 * documents_per_row(MIX)
    cli = subprocess.run([sys.executable, "-m", "quantbuild.baseline.train", "--tokenizer", str(BASELINE), "--out",
                          "/nonexistent/never", "--steps", "1", "--mix", "retrieval=-1"], capture_output=True, text=True)
    assert cli.returncode == 1 and cli.stderr.strip().splitlines()[-1].startswith("quantbuild: --mix: the weight")
