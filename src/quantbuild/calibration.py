"""Compose the calibration set: a seeded, weighted mix of calibration sources, tokenized.

Only token IDs and digests are written; the text itself never leaves `data/` (privacy: a
packaged artifact carries the digest and composition, not the prompts).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

from quantbuild.config import CalibrationConfig
from quantbuild.errors import DataError
from quantbuild.hashing import sha256_bytes, sha256_file, staged_dir, write_json
from quantbuild.prompts import ChatTemplate
from quantbuild.tasks.calibration_sources import load_source, rendered

TOKENS = "tokens.safetensors"
RECORD = "calibration_record.json"


def allocate(samples: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `samples` across sources in proportion to `weights` (largest remainder)."""
    total = sum(weights.values())
    exact = {name: samples * weight / total for name, weight in weights.items()}
    counts = {name: int(value) for name, value in exact.items()}
    leftovers = sorted(exact, key=lambda name: (counts[name] - exact[name], name))
    for name in leftovers[: samples - sum(counts.values())]:
        counts[name] += 1
    return dict(sorted(counts.items()))


def draw_texts(config: CalibrationConfig, data_dir: Path, samples: int,
               chat_template: Optional[str] = None) -> tuple[list[str], dict]:
    """`samples` texts drawn from the sources in proportion to their weights (seeded), and
    the composition: per source its file, sha256, weight, samples drawn, pool size and
    whether its conversations were rendered through `chat_template` (an instruct model's;
    `calibration.chat` switches a source, default on where its records are conversations)."""
    template = ChatTemplate(chat_template) if chat_template else None
    composition = {}
    texts: list[str] = []
    for name, count in allocate(samples, dict(config.sources)).items():
        path = data_dir / f"{name}.jsonl"
        pool = load_source(path)
        rng = random.Random(f"calibration:{config.seed}:{name}")
        chosen = [pool[rng.randrange(len(pool))] for _ in range(count)] if count > len(pool) else rng.sample(pool, count)
        chat = template is not None and config.chat.get(name, all("messages" in record for record in pool))
        if chat and not all("messages" in record for record in chosen):
            raise DataError(f"{path}: calibration.chat.{name} is on, and a record has no 'messages' to render")
        texts.extend(rendered(record, template) if chat else record["text"] for record in chosen)
        composition[name] = {"file": path.as_posix(), "sha256": sha256_file(path), "weight": config.sources[name],
                             "samples": count, "available": len(pool), "chat_template": bool(chat)}
    if not texts:
        raise DataError("calibration: the mix selected no samples")
    return texts, composition


def compose_calibration(config: CalibrationConfig, data_dir: Path, tokenizer_dir: Path, out: Path) -> dict:
    """Write `tokens.safetensors` (flat int32 IDs + offsets) and a record with digests
    (`tokenizer_dir` is the baseline folder)."""
    import numpy as np
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts, composition = draw_texts(config, data_dir, config.samples, tokenizer.chat_template)
    encoded = [ids[: config.seq_len] for ids in tokenizer(texts)["input_ids"]]
    flat = np.asarray([token for ids in encoded for token in ids], dtype=np.int32)
    offsets = np.cumsum([0] + [len(ids) for ids in encoded], dtype=np.int64)
    with staged_dir(out) as staging:
        save_file({"input_ids": flat, "offsets": offsets}, str(staging / TOKENS))
        record = {
            "samples": len(encoded),
            "tokens": int(flat.size),
            "seq_len": config.seq_len,
            "seed": config.seed,
            "composition": composition,
            "tokens_sha256": sha256_file(staging / TOKENS),
            "digest": sha256_bytes(flat.tobytes() + offsets.tobytes()),
        }
        write_json(staging / RECORD, record)
    return record


def load_calibration(folder: Path) -> list[list[int]]:
    """The calibration samples as lists of token IDs, in their stored order."""
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / TOKENS))
    flat, offsets = tensors["input_ids"], tensors["offsets"]
    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
