"""The bundled baseline: pinned, loadable with the Auto classes, and genuinely able."""

import json

import pytest
import yaml

from conftest import BASELINE, REPO
from quantbuild.hashing import digest_tree
from quantbuild.tasks.items import load_items


def test_files_match_their_pins():
    pins = yaml.safe_load((REPO / "conf" / "model" / "workflow-llama-8m.yaml").read_text())
    assert pins["files"] == digest_tree(BASELINE)


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
    records = run_generative(model, tokenizer, items, batch_size=24)
    assert sum(record["correct"] for record in records) / len(records) >= FLOORS[family]


def test_perplexity_is_low_on_held_out_text(loaded):
    from quantbuild.evaluation.suites import perplexity

    model, tokenizer = loaded
    texts = [item.prompt for item in load_items(REPO / "data" / "eval" / "language_modelling.jsonl")[:16]]
    assert perplexity(model, tokenizer, texts)["perplexity"] < 4.0
