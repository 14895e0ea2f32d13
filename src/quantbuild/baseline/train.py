"""Train the bundled baseline: a small `LlamaForCausalLM` on the task-family mix.

    python -m quantbuild.baseline.train --tokenizer data/baseline/workflow-llama-8m \
        --out /tmp/model --steps 6000 --seed 0

Training data is generated on the fly from seeds disjoint from the eval seeds, packed into
rows of `seq_len` tokens (whole examples only; the tail of a row is padding that carries no
loss). On a GPU, bf16 autocast and SDPA attention; the seed fixes data order and
initialisation, though GPU kernels make the last bits of the weights nondeterministic.

A run longer than one sitting (a lent GPU's call limit) goes in pieces: `--checkpoint DIR
--stop-after SECONDS` stores the state and stops; the same command again resumes there.
On several GPUs of one host, data parallel: `torchrun --nproc_per_node N -m
quantbuild.baseline.train ... --checkpoint DIR` (the same global batch, split over the ranks).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from multiprocessing import Pool
from pathlib import Path

from quantbuild.errors import ConfigError, QuantbuildError

TARGET_WEIGHT = 4  # loss weight of answer tokens: they are a few percent of all tokens
MIX = {"language_modelling": 1.5, "structured": 3.0, "retrieval": 5.0, "long_context": 1.5, "reasoning": 3.0}


def baseline_config(vocab_size: int, **overrides):
    """The bundled architecture: 8 layers, hidden 256, 8 heads of 32 (a multiple of 128, so group sizes
    32/64/128 divide every layer), tied embeddings, about 7.9M parameters."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def _rows_for_chunk(args: tuple[str, int, int, int, int, dict[str, float]]):
    """Pack freshly sampled examples into rows of exactly `seq_len` tokens (pad id 0), with a
    per-token loss weight: 0 for padding, 1 for prompts, `TARGET_WEIGHT` for answers. A
    tokenizer with a chat template gets conversations rendered through it (an instruct
    model); one without gets raw prompts and answers (a base model)."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer_dir, seed, chunk, rows, seq_len, mix = args
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(f"train:{seed}:{chunk}")
    packed: list[list[int]] = []
    weights: list[list[int]] = []
    current: list[int] = []
    current_weights: list[int] = []
    examples = _chat_examples(tokenizer, rng, mix, seq_len) if tokenizer.chat_template else \
        _raw_examples(tokenizer, rng, mix, seq_len)
    for ids, row_weights in examples:
        if len(current) + len(ids) > seq_len:
            pad = seq_len - len(current)
            packed.append(current + [tokenizer.pad_token_id] * pad)
            weights.append(current_weights + [0] * pad)
            current, current_weights = [], []
            if len(packed) == rows:
                break
        current += ids
        current_weights += row_weights
    return np.asarray(packed, dtype=np.int16), np.asarray(weights, dtype=np.uint8)


def _raw_examples(tokenizer, rng: random.Random, mix: dict[str, float], seq_len: int):
    """(ids, weights) of prompt + answer + EOS, the prompt with the tokenizer's BOS."""
    from quantbuild.tasks import sample_training_item, training_pair

    while True:
        pairs = [training_pair(sample_training_item(rng, mix)) for _ in range(256)]
        prompts = tokenizer([prompt for prompt, _ in pairs])["input_ids"]
        targets = tokenizer([target for _, target in pairs], add_special_tokens=False)["input_ids"]
        for prompt_ids, target_ids in zip(prompts, targets):
            answer = TARGET_WEIGHT if target_ids else 1
            ids = (prompt_ids + target_ids)[: seq_len - 1] + [tokenizer.eos_token_id]
            yield ids, ([1] * len(prompt_ids) + [answer] * len(target_ids))[: seq_len - 1] + [answer]


def _chat_examples(tokenizer, rng: random.Random, mix: dict[str, float], seq_len: int):
    """(ids, weights) of conversations through the tokenizer's chat template, special tokens
    parsed, every assistant turn weighted as an answer; prose ends with EOS. A conversation
    longer than `seq_len` is drawn again, never cut."""
    from quantbuild.baseline.chat import conversation_pieces
    from quantbuild.prompts import ChatTemplate

    template = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "")
    eos = tokenizer.convert_tokens_to_ids("<|eos|>")
    while True:
        conversations = [conversation_pieces(template, rng, mix) for _ in range(256)]
        tokenized = iter(tokenizer([text for pieces in conversations for text, _ in pieces],
                                   add_special_tokens=False)["input_ids"])
        for pieces in conversations:
            ids: list[int] = []
            row_weights: list[int] = []
            for (_, answer), piece in zip(pieces, tokenized):
                ids += piece
                row_weights += [TARGET_WEIGHT if answer else 1] * len(piece)
            if len(pieces) == 1:
                ids, row_weights = ids + [eos], row_weights + [1]
            if len(ids) <= seq_len:
                yield ids, row_weights


def build_rows(tokenizer_dir: str, seed: int, total_rows: int, seq_len: int, workers: int,
               mix: dict[str, float] | None = None):
    import torch

    per_chunk = 512
    jobs = [(tokenizer_dir, seed, chunk, per_chunk, seq_len, mix or MIX) for chunk in range(math.ceil(total_rows / per_chunk))]
    with Pool(workers) as pool:
        chunks = pool.map(_rows_for_chunk, jobs)
    rows = torch.cat([torch.from_numpy(ids) for ids, _ in chunks])[:total_rows]
    weights = torch.cat([torch.from_numpy(w) for _, w in chunks])[:total_rows]
    return rows, weights


def _step_seconds(model, batch: int, seq_len: int, device: str) -> float:
    """Median time of one optimiser step on random tokens, to size a run to a time budget."""
    import statistics

    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(12):
        ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), device=device)
        started = time.time()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - started)
    return statistics.median(times[2:])


# A resumable run's state (`--checkpoint DIR`): model, optimiser and schedule at a step, and
# the packed rows, so a run longer than one session's machine goes on where it stopped.
STATE, ROWS = "state.pt", "rows.pt"


def _distributed():
    """(rank, world size) under `torchrun --nproc_per_node N` (NCCL on GPUs, one per rank;
    gloo on a CPU), else (0, 1)."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _agree(value: float, world: int, op: str = "sum") -> float:
    """`value` reduced over the ranks (sum or max); itself on one process."""
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.item()


def train(tokenizer_dir: Path, out: Path, steps: int, batch: int, seq_len: int, lr: float, seed: int,
          workers: int, time_budget: float = 0.0, architecture: dict | None = None,
          max_shard_size: str = "5GB", checkpoint: Path | None = None, stop_after: float = 0.0,
          mix: dict[str, float] | None = None, init: Path | None = None) -> dict:
    """Train and save the model to `out`; with `time_budget` (seconds), `steps` is replaced by
    the largest multiple of 100 that a timing probe says fits (the record keeps the count,
    so the run is reproducible with `--steps`).

    With `checkpoint`, a run resumes from the state stored there (its settings must match),
    and with `stop_after` (seconds of training) it stores its state and stops early, saving
    no model: the same run in several pieces gives the same weights as in one (on a CPU
    bit for bit; on a GPU up to its kernels' nondeterminism). `stop_after` counts from this
    call's start, data preparation included, so a piece fits a machine's call limit.

    Under torchrun with N processes (data parallel), each rank computes `batch / N` rows of
    every step and the loss is normalised over the whole step's answer-weighted tokens, so
    the update is the one-process update up to the order of floating-point sums; rank 0
    packs the rows into `checkpoint` (required) and is the one that writes.

    `mix` overrides the relative weights of the task families in the training data (`MIX`),
    e.g. {"retrieval": 8.0}; an unknown family or a weight that is not positive is refused.

    `init` fine-tunes a trained model instead of starting from random weights (its
    architecture, not `architecture`): its embeddings grow to the tokenizer's vocabulary
    (new rows start at the mean embedding) and its positions to `seq_len`, and its
    end-of-sequence token becomes the tokenizer's (an instruct model's end of turn)."""
    import torch
    from transformers import AutoTokenizer

    called = time.time()
    rank, world = _distributed()
    if world > 1 and (checkpoint is None or batch % world):
        raise ConfigError(f"data parallel over {world} processes needs --checkpoint (the ranks share the packed rows "
                          f"through it) and --batch divisible by {world} (got {batch})")
    mix = training_mix(mix)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    local = batch // world
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = baseline_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             **(architecture or {}))
    state = torch.load(checkpoint / STATE, map_location=device) if checkpoint and (checkpoint / STATE).is_file() else None
    settings = {"batch": batch, "seq_len": seq_len, "lr": lr, "seed": seed, "architecture": architecture or {}}
    if init is not None:
        settings["init"] = str(init)
    if mix != MIX:  # a run on the default mix keeps the settings of checkpoints made before `mix` existed
        settings["mix"] = mix
    if state is not None:
        if state["settings"] != settings:
            raise ConfigError(f"{checkpoint / STATE}: a run with other settings ({state['settings']}); "
                             f"resume with those, or use another --checkpoint folder")
        steps = state["steps"]
    elif time_budget:
        step_seconds = _agree(_step_seconds(_initial(init, config, tokenizer, seq_len).to(device), local, seq_len,
                                            device), world, "max")
        steps = max(100, int(time_budget / step_seconds) // 100 * 100)
        if rank == 0:
            print(json.dumps({"probe_step_seconds": round(step_seconds, 4), "steps": steps}), flush=True)
    started = time.time()
    if rank == 0:
        rows, weights = _rows(tokenizer_dir, seed, steps * batch, seq_len, workers, checkpoint, mix)
    _agree(0, world)  # the other ranks read the rows rank 0 packed
    if rank != 0:
        rows, weights = _rows(tokenizer_dir, seed, steps * batch, seq_len, workers, checkpoint, mix)
    data_seconds = time.time() - started
    torch.manual_seed(seed)
    model = _initial(init, config, tokenizer, seq_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
    first, log, trained = 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first, log, trained = state["step"], state["log"], state["train_seconds"]
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model)
    model.train()
    train_started = time.time()
    for step in range(first, steps):
        begin = step * batch + rank * local
        ids = rows[begin : begin + local].to(device=device, dtype=torch.long)
        weight = weights[begin : begin + local, 1:].to(device=device, dtype=torch.float32)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = forward(input_ids=ids).logits
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        weighted = (token_loss * weight).sum()
        total = _agree(weight.sum().item(), world) if world > 1 else weight.sum()
        # DDP averages the ranks' gradients: times `world`, the sum over the step's tokens.
        (weighted / total * world).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = trained + time.time() - train_started
        if step % 200 == 0 or step == steps - 1:
            loss = _agree(weighted.item(), world) / float(total)
            log.append({"step": step, "loss": round(loss, 4), "seconds": round(seconds, 1)})
            if rank == 0:
                print(json.dumps(log[-1]), flush=True)
        stop = checkpoint and stop_after and step + 1 < steps and \
            _agree(time.time() - called >= stop_after, world, "max")
        if stop:
            if rank == 0:
                torch.save({"settings": settings, "steps": steps, "step": step + 1, "log": log, "train_seconds": seconds,
                            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()}, checkpoint / STATE)
                print(json.dumps({"stopped_at_step": step + 1, "of": steps, "state": str(checkpoint / STATE)}), flush=True)
            _agree(0, world)
            return {"stopped_at_step": step + 1, "steps": steps}
    model = model.to(torch.float16).eval()
    model.generation_config.do_sample = False
    if rank == 0:
        model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(out))
    _agree(0, world)
    return {
        "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "seed": seed,
        "tokens": steps * batch * seq_len, "data_seconds": round(data_seconds, 1),
        "train_seconds": round(trained + time.time() - train_started, 1), "parameters": model.num_parameters(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "processes": world,
        "resumed": state is not None, "torch": torch.__version__, "mix": mix,
        "architecture": architecture or {} if init is None else {
            key: getattr(model.config, key) for key in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                        "num_attention_heads", "num_key_value_heads")},
        "init": str(init) if init is not None else None,
        "log": log,
        "rank": rank,
    }


def _initial(init: Path | None, config, tokenizer, seq_len: int):
    """A fresh model of `config`, or the trained model in `init` fitted to `tokenizer`."""
    import torch
    from transformers import LlamaForCausalLM

    if init is None:
        return LlamaForCausalLM(config)
    model = LlamaForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[old:] = weight[:old].mean(dim=0)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, seq_len)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def training_mix(overrides: dict[str, float] | None) -> dict[str, float]:
    """`MIX` with `overrides` applied, checked: every family known, every weight positive."""
    mix = dict(MIX)
    for family, weight in sorted((overrides or {}).items()):
        if family not in MIX:
            raise ConfigError(f"--mix: unknown task family {family!r} (one of {', '.join(sorted(MIX))})")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ConfigError(f"--mix: the weight of {family} must be a positive number, got {weight!r}")
        mix[family] = float(weight)
    return mix


def parse_mix(pairs: list[str]) -> dict[str, float]:
    """`["retrieval=8"]` -> {"retrieval": 8.0}; a malformed pair is one ConfigError."""
    mix = {}
    for pair in pairs:
        family, _, weight = pair.partition("=")
        try:
            mix[family] = float(weight)
        except ValueError:
            raise ConfigError(f"--mix: expected FAMILY=WEIGHT, got {pair!r}") from None
    return mix


def _schedule(steps: int):
    """Linear warm-up over 2% of the steps, then cosine decay to 10% of the peak rate."""
    warmup = max(1, steps // 50)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return schedule


def _rows(tokenizer_dir: Path, seed: int, total_rows: int, seq_len: int, workers: int, checkpoint: Path | None,
          mix: dict[str, float]):
    """The packed training rows, built once per checkpoint folder (a resumed run reads them)."""
    import torch

    cached = checkpoint / ROWS if checkpoint else None
    if cached is not None and cached.is_file():
        stored = torch.load(cached)
        return stored["rows"], stored["weights"]
    rows, weights = build_rows(str(tokenizer_dir), seed, total_rows, seq_len, workers, mix)
    if cached is not None:
        checkpoint.mkdir(parents=True, exist_ok=True)
        torch.save({"rows": rows, "weights": weights}, cached)
    return rows, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--time-budget", type=float, default=0.0, help="seconds; sizes --steps by a probe")
    # A larger sibling of the bundled architecture (e.g. --hidden 512 --layers 9 --intermediate 1536).
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 13MB")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a folder for a resumable run: resumes from its state, stores it on --stop-after")
    parser.add_argument("--stop-after", type=float, default=0.0,
                        help="seconds (from the start, data included), then store the state in --checkpoint and stop")
    parser.add_argument("--init", type=Path, default=None,
                        help="fine-tune this trained model (e.g. into an instruct model with a chat tokenizer)")
    parser.add_argument("--mix", nargs="*", default=[], metavar="FAMILY=WEIGHT",
                        help=f"override task-family weights of the training data (default {MIX})")
    args = parser.parse_args()
    architecture = {"hidden_size": args.hidden, "num_hidden_layers": args.layers,
                    "intermediate_size": args.intermediate, "num_attention_heads": args.heads,
                    "num_key_value_heads": args.heads}
    if args.stop_after and not args.checkpoint:
        parser.error("--stop-after needs --checkpoint (where the state goes)")
    try:
        record = train(args.tokenizer, args.out, args.steps, args.batch, args.seq_len, args.lr, args.seed,
                       args.workers, args.time_budget, architecture, args.max_shard_size, args.checkpoint,
                       args.stop_after, parse_mix(args.mix), args.init)
    except QuantbuildError as err:
        parser.exit(1, f"quantbuild: {err}\n")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if "stopped_at_step" not in record and record.pop("rank") == 0:
        (args.out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
