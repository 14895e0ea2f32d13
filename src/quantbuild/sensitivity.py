"""Per-layer sensitivity at the formats a planner may choose, on the calibration mix and per
task family.

For every planned variant of the ladder (a GGUF auto-mix with `target_bpw`, a GPTQ `mixed`
variant with `target_bits`) and every candidate format it may give a layer, each decoder
linear layer alone is replaced by its real quantized weight, dequantized, and the KL
divergence KL(P_baseline || P_quantized) is measured

- on the calibration mix (`calibration.sensitivity.samples` samples, every position), and
- per task family, on the answer positions of fresh items of that family (as many as fit
  in `calibration.sensitivity.family_tokens` tokens), generated from a seed disjoint from
  the eval and calibration seeds (planning never sees the items the gate scores).

That is the `kl` measure: a forward pass per layer and candidate, so its cost grows with
layers x candidates x tokens. The `weight_error` measure scores the same quantized weights
without any forward pass per candidate: each layer's squared quantization error weighted by
the diagonal of the Fisher information of each probe set's next-token distributions (from
one forward and a few backward passes of the baseline; `_Importance`). From
`calibration.sensitivity.sample_rows_params` decoder weights up it scores a sample of each
tensor's rows (`RowSample`: llama-quantize quantizes a thumbnail of the base GGUF holding
those rows: at stride 4 an eighth whole and a quarter of the rest, 34% of the work at each type), and the table records the sample
(`row_sample`). The stage
uses `calibration.sensitivity.measure` (`auto`: weight_error from
`auto_weight_error_params` decoder weights up; bench/README.md has the evidence), and the
table and every plan made from it name the measure.

The quantized weights come from the library that builds the variant, so the table describes
the formats that ship: llama-quantize writes the whole decoder at one llama.cpp type from
the base GGUF, with the variant's importance-matrix setting, and gguf-py reads it back;
GPTQModel quantizes the baseline uniformly at one bit width and group size (with the
variant's other GPTQ settings) and its torch kernel dequantizes. Each measurement runs the
model in float32 from the perturbed layer's block onward, from cached hidden states, on CPU
or the first GPU, deterministically.

With `calibration.sensitivity.check_stretches`, the stage also plans each GGUF auto-mix of
the ladder (in ladder order, each from the plan below it) in stretches of its budget, and
keeps a stretch only where the whole plan, every layer at its candidate's real quantized
weight at once, has lower KL on probes held out from the table's (`probes.check_sets`):
the per-layer table ranks the promotions, a measurement of the plan decides them. The
table records each verdict (`check`), and the quantize stage replays them.

Output: one `<variant>.json` per ladder variant (a stub for variants that plan nothing, so
that a quantize stage depends only on its own variant's table) and `sensitivity_record.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

from quantbuild.config import SensitivityConfig
from quantbuild.gguf_artifacts import BASE_FILE, require_base, require_imatrix
from quantbuild.quantizers.planner import Candidate, Level, PlanCheck, candidates_of
from quantbuild.runtimes.protocol import TORCH, LoadSpec, open_runtime
from quantbuild.probes import FAMILY_SEED, Probe, check_sets, probe_sets, probes_digest
from quantbuild.errors import ConfigError
from quantbuild.tasks.write_data import PLAN_CHECK_SEED
from quantbuild.hashing import sha256_file, staged_dir, write_json

RECORD = "sensitivity_record.json"
# How a layer's sensitivity at a candidate is measured: the KL divergence of the model with
# that layer alone quantized (a forward pass per layer and candidate), or the weight-space
# measure (importance-weighted quantization error, no forward pass per candidate); `auto`
# picks by model size.
KL, WEIGHT_ERROR, AUTO = "kl", "weight_error", "auto"
MEASURES = (AUTO, KL, WEIGHT_ERROR)
# random projections per probe batch for the weight-space measure's Fisher estimate
DRAWS = 4
# The weight-space measure keeps each probe set's Fisher diagonal (one float per weight) in
# float32 beside the model while every set, and the one being collected, fit in this share
# of the memory free after loading it; beyond that (an 8B model's five sets are 140 GB in
# float32) each set, once collected, is kept in bfloat16 in host memory and moved back a
# layer at a time to score a candidate, and each set is summed a run of layers at a time,
# as many as this share of the free memory holds in float32 (`_Importance._chunks`). The
# tables say which (`fisher`).
FISHER_SHARE = 0.5
# The most memory one layer's per-sequence gradient products may take at once.
PER_SEQUENCE_BYTES = 1 << 30


# --- quantized weights of a candidate -------------------------------------------------------

def unpermute(weight: Any, heads: int) -> Any:
    """Undo the converter's rotary row permutation of a Q/K weight over `heads` heads."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


class Dequantized(Mapping):
    """The tensors `names` maps to GGUF tensor names (key -> GGUF name) of the GGUF file
    `path`, each read, dequantized to float32 [rows, cols] and, where `orientation` gives a
    head count, the converter's rotary permutation undone (the HF layout) when it is looked
    up: one tensor in memory at a time rather than the whole decoder (28 GB at 8B)."""

    def __init__(self, path: Path, names: dict[str, str], orientation: Optional[dict[str, Optional[int]]] = None):
        import numpy as np

        from quantbuild.runtimes.gguf_file import layout
        from quantbuild.runtimes.llama_build import vendored_converter

        vendored_converter()
        self.path, self._names, self._orientation = path, names, orientation or {}
        wanted = set(names.values())
        self._tensors = {tensor.name: tensor for tensor in layout(path).tensors if tensor.name in wanted}
        self._data = np.memmap(path, dtype=np.uint8, mode="r")

    def __getitem__(self, key: str) -> Any:
        import gguf
        import numpy as np

        tensor = self._tensors[self._names[key]]
        raw = np.array(self._data[tensor.offset: tensor.offset + tensor.nbytes])
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[tensor.type_name])
        weight = np.asarray(values, dtype=np.float32).reshape(tensor.dims[1], tensor.dims[0])
        heads = self._orientation.get(key)
        return np.ascontiguousarray(unpermute(weight, heads)) if heads else weight

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def gguf_layer_orientation(baseline: Path, gguf_base: Path, names: dict[str, str]) -> dict[str, Optional[int]]:
    """Per layer: None if the base GGUF stores it as the HF weight, or the head count whose
    rotary permutation the converter applied; read off the base GGUF (the same weights at
    F16/BF16/F32) a layer at a time, and an error where neither layout matches."""
    import numpy as np
    import torch
    from safetensors import safe_open

    config = json.loads((baseline / "config.json").read_text())
    stored = Dequantized(gguf_base / BASE_FILE, names)
    where = {}
    for path in sorted(baseline.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            where.update({key[:-len(".weight")]: path for key in handle.keys()
                          if key.endswith(".weight") and key[:-len(".weight")] in names})
    orientation = {}
    for layer, gguf_name in sorted(names.items()):
        with safe_open(str(where[layer]), framework="pt") as handle:
            reference = handle.get_tensor(f"{layer}.weight").to(torch.float32).numpy()
        base = stored[layer]
        if np.allclose(base, reference, rtol=1e-3, atol=1e-6):
            orientation[layer] = None
            continue
        heads = sorted({config.get("num_attention_heads", 0), config.get("num_key_value_heads", 0)} - {0})
        match = next((count for count in heads if base.shape == reference.shape and base.shape[0] % (2 * count) == 0
                      and np.allclose(unpermute(base, count), reference, rtol=1e-3, atol=1e-6)), 0)
        if not match:
            raise ConfigError(f"sensitivity: the base GGUF's {gguf_name} matches {layer} in no known layout "
                              f"(rerun the gguf_base stage)")
        orientation[layer] = match
    return orientation


def gguf_weights(candidate: Candidate, baseline: Path, gguf_base: Path, layers: dict, work: Path,
                 orientation: Optional[dict[str, Optional[int]]] = None,
                 imatrix: Optional[Path] = None, source: Optional[Path] = None) -> Dequantized:
    """Every decoder layer at `candidate`'s llama.cpp type, as llama-quantize writes it into
    `work/<candidate key>.gguf` (the caller removes it when done), each layer dequantized
    in the HF layout when it is read (`orientation`: `gguf_layer_orientation`'s answer, when
    the caller has it already; `imatrix`: the imatrix stage's folder, for a candidate that
    uses the matrix). `source`: a thumbnail of the base GGUF (`RowSample`) quantized
    instead of it; its rows are read as stored (the sample maps them to the HF rows)."""
    from quantbuild.quantizers.gguf import gguf_names, tensor_type_file
    from quantbuild.runtimes.llama_build import cores, run_tool

    names = gguf_names(baseline, layers)
    base = source or require_base(gguf_base)
    matrix = require_imatrix(imatrix) if candidate.imatrix else None
    plan = {layer: {"gguf_name": names[layer], "type": candidate.name} for layer in layers}
    types_file, out = work / f"{candidate.key}.types.txt", work / f"{candidate.key}.gguf"
    tensor_type_file(plan, types_file)
    args = (["--imatrix", str(matrix)] if matrix else []) + ["--tensor-type-file", str(types_file)]
    run_tool("llama-quantize", [*args, str(base), str(out), "Q8_0", str(cores())], f"sensitivity {candidate.key}")
    if source is None:
        orientation = orientation or gguf_layer_orientation(baseline, gguf_base, names)
    return Dequantized(out, {layer: names[layer] for layer in layers}, None if source else orientation)


class RowSample:
    """Which rows of each decoder tensor the weight-space measure scores, and how much each
    counts: the most influential rows (`influence`: `_Importance.influence`'s per-row share),
    one in 2 x `stride`, whole (weight 1), and every `stride`-th of the rest standing for the
    rows between (weight: the rest's count over the sampled count). Every row counts
    where a tensor has fewer than 4 x `stride` rows. Forced on the bundled 33M model at
    stride 4, the stage's table moved by 2.3% (median), Spearman 0.9999 against every row,
    and 0-3 of 63 layers changed type in plans at 3.5-4.5 bpw; plain every-k-th sampling
    was off by up to 27% on tensors' errors (bench/README.md, `bench/row_sample.py`).

    `rows[layer]`: the sampled HF rows, ordered as the thumbnail stores them (ascending GGUF
    row: a Q/K weight's rows are permuted by the converter); `weights[layer]`: each one's
    weight. `thumbnail` writes the base GGUF with only those rows."""

    def __init__(self, influence: dict[str, Any], stride: int, orientation: dict[str, Optional[int]]):
        import numpy as np

        self.stride, self.rows, self.weights, self.gguf_rows = stride, {}, {}, {}
        self.total = sum(len(per_row) for per_row in influence.values())
        for layer, per_row in sorted(influence.items()):
            count = len(per_row)
            if count < 4 * stride:
                chosen, weight = np.arange(count), np.ones(count)
            else:
                whole = np.sort(np.argsort(-np.asarray(per_row), kind="stable")[: count // (2 * stride)])
                rest = np.setdiff1d(np.arange(count), whole)
                sampled = rest[::stride]
                chosen = np.concatenate([whole, sampled])
                weight = np.concatenate([np.ones(len(whole)), np.full(len(sampled), len(rest) / len(sampled))])
            heads = orientation.get(layer)
            # HF row i is GGUF row to_gguf[i] (sensitivity.unpermute)
            to_gguf = unpermute(np.arange(count)[:, None], heads).ravel() if heads else np.arange(count)
            order = np.argsort(to_gguf[chosen], kind="stable")
            self.rows[layer], self.weights[layer] = chosen[order], weight[order]
            self.gguf_rows[layer] = to_gguf[chosen][order]

    def thumbnail(self, base: Path, names: dict[str, str], out: Path) -> Path:
        from quantbuild.runtimes.gguf_file import with_rows

        with_rows(base, {names[layer]: rows for layer, rows in self.gguf_rows.items()}, out)
        return out

    def record(self) -> dict[str, Any]:
        return {"stride": self.stride, "rows": int(sum(len(rows) for rows in self.rows.values())), "of": self.total,
                "kept_whole": "the most influential rows, one in 2 x stride"}


def gptq_weights(candidate: Candidate, variant: Any, baseline: Path, calibration: list[list[int]],
                 work: Path) -> dict[str, Any]:
    """Every decoder layer as GPTQModel quantizes the baseline uniformly at `candidate`."""
    from quantbuild.quantizers.gptq import gptq_config
    from quantbuild.quantizers.gptqmodel_backend import quantize_and_save
    from quantbuild.quantizers.rtn import quantizable_linears

    uniform = replace(variant, bits=candidate.bits, group_size=candidate.group_size)
    folder = work / candidate.key
    quantize_and_save(baseline, gptq_config(uniform), calibration, folder)
    # read back as the torch runtime dequantizes it (float32 Linear layers)
    with open_runtime(LoadSpec(TORCH, folder, load_runtime="dequantized")) as runtime:
        return {name: module.weight.detach().float().cpu().numpy().copy()
                for name, module in quantizable_linears(runtime.model).items()}


# --- the measurement ------------------------------------------------------------------------

BATCH_TOKENS = 1024


def _groups(probes: list[Probe]) -> list[list[Probe]]:
    """Probes sorted by length, batched while the padded batch stays within BATCH_TOKENS."""
    ordered = sorted(probes, key=lambda probe: (len(probe.ids), probe.ids))
    groups: list[list[Probe]] = []
    for probe in ordered:
        if groups and (len(groups[-1]) + 1) * len(probe.ids) <= BATCH_TOKENS:
            groups[-1].append(probe)
        else:
            groups.append([probe])
    return groups


def _significant(value: float) -> float:
    return float(f"{value:.4g}")


class _Scorer:
    """The baseline in float32 with cached block inputs and reference log-probabilities;
    `kld(layer, weight)` runs the model from that layer's block onward with it replaced.

    The baseline is loaded by the torch runtime (dequantized: float32 on every device);
    this is the one measurement that reaches inside the runtime's model, since it swaps a
    single layer's weight and reruns only the blocks after it."""

    def __init__(self, baseline: Path, sets: dict[str, list[Probe]], every_block: bool = True):
        """`every_block`: cache each block's inputs (to run from any layer on); else only the
        first block's, for scoring whole plans."""
        import torch

        from quantbuild.quantizers.rtn import quantizable_linears

        self.every_block = every_block
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = open_runtime(LoadSpec(TORCH, baseline, load_runtime="dequantized", device=self.device)).model
        self.linears = quantizable_linears(self.model)
        self.blocks = list(self.model.model.layers)
        # Per probe set, batches of sequences of similar length (little padding).
        self.batches = {name: [self._batch(group) for group in _groups(probes)] for name, probes in sets.items() if probes}
        self.hidden: dict[str, list[list[Any]]] = {}
        self.reference: dict[str, list[Any]] = {}
        with torch.inference_mode():
            for name, batches in self.batches.items():
                self.hidden[name], self.reference[name] = [], []
                for ids, mask, scored in batches:
                    out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                    self.hidden[name].append(list(out.hidden_states[: len(self.blocks) if every_block else 1]))
                    self.reference[name].append(torch.log_softmax(out.logits.float()[scored], dim=-1))

    def _batch(self, probes: list[Probe]) -> tuple[Any, Any, Any]:
        return _padded(probes, self.device)

    def block_of(self, layer: str) -> int:
        return next(index for index, block in enumerate(self.blocks)
                    if any(module is self.linears[layer] for module in block.modules()))

    def kld(self, layer: str, weight: Any) -> dict[str, float]:
        return self.swapped({layer: weight})

    def swapped(self, weights: dict[str, Any]) -> dict[str, float]:
        """Mean KL per probe set with each layer in `weights` given that weight, the model run
        from the first changed layer's block onward."""
        import torch

        modules = {layer: self.linears[layer] for layer in weights}
        start = min(self.block_of(layer) for layer in weights) if self.every_block else 0
        originals = {layer: module.weight.detach().clone() for layer, module in modules.items()}
        layers = self.model.model.layers
        try:
            with torch.no_grad():
                for layer, module in modules.items():
                    module.weight.copy_(torch.as_tensor(weights[layer], dtype=torch.float32))
            self.model.model.layers = torch.nn.ModuleList(self.blocks[start:])
            result = {}
            with torch.inference_mode():
                for name, batches in self.batches.items():
                    total, positions = 0.0, 0
                    for index, (_, mask, scored) in enumerate(batches):
                        logits = self.model(inputs_embeds=self.hidden[name][index][start], attention_mask=mask).logits
                        perturbed = torch.log_softmax(logits.float()[scored], dim=-1)
                        base = self.reference[name][index]
                        total += float(torch.sum(base.exp() * (base - perturbed)))
                        positions += int(base.shape[0])
                    result[name] = total / max(1, positions)
            return result
        finally:
            self.model.model.layers = layers
            with torch.no_grad():
                for layer, module in modules.items():
                    module.weight.copy_(originals[layer])


class _Importance:
    """The weight-space measure: the KL divergence a layer's quantization error would cause,
    from a second-order expansion around the baseline, with no forward pass per candidate.

    For a small change dW of one layer, the mean KL(P_baseline || P_quantized) over a probe
    set's scored positions is about 1/2 sum_jc F_jc dW_jc^2 / positions, F the diagonal of
    the Fisher information of those next-token distributions with respect to the weight. F
    comes from the baseline alone: F = J^T (diag(p) - p p^T) J, J the logits' Jacobian. At
    each scored position diag(p) - p p^T = B B^T with B = (I - p 1^T) diag(sqrt p), so for
    a random sign vector r the gradient of (B r) . logits, squared, is an unbiased estimate
    of F's diagonal (per probe sequence, the positions' gradients summed, then squared;
    seeded, `DRAWS` draws); one forward and `DRAWS` backward passes per batch of probes,
    however many candidates there are. Every draw weighs each token by its probability:
    the estimate from next tokens *drawn* from p (the first version) almost never draws
    the tail of a confident distribution, which is where its Fisher is, and underestimated
    the long-context answers' KL 800-7,000 fold and the structured answers' 1-7 fold on the
    bundled model (bench/README.md, issue #27). Weighting by the inputs alone (what
    llama-imatrix collects and llama.cpp's quantizer weighs its rounding by) ranked the
    layers of the bundled model poorly against the measured KL (Spearman 0.23-0.28 within a
    type, against 0.94-0.96 for this estimate): it misses how strongly each layer's output
    reaches the logits, which the gradient carries."""

    def __init__(self, baseline: Path, sets: dict[str, list[Probe]], seed: int = 0):
        import torch

        from quantbuild.quantizers.rtn import quantizable_linears

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = open_runtime(LoadSpec(TORCH, baseline, load_runtime="dequantized", device=self.device)).model
        model.requires_grad_(False)
        self.linears = quantizable_linears(model)
        collected = 1 + sum(1 for probes in sets.values() if probes)
        needed = 4 * collected * sum(module.weight.numel() for module in self.linears.values())
        self.compact = needed > FISHER_SHARE * _free_memory(self.device)
        self.storage = "bfloat16, host memory" if self.compact else "float32"
        # the weights, to measure each candidate's error against: in float32 beside the model
        # where the Fisher fits too, else in host memory in the narrowest type that holds them
        # exactly (at 8B 28 GB in float32 is more than the model and one probe set's Fisher
        # leave free on an 80 GB card; a float16 or bfloat16 checkpoint's weights take 14)
        self.original = {name: _exact_compact(module.weight.detach()) if self.compact else module.weight.detach().float()
                         for name, module in self.linears.items()}
        # per layer and probe set: (the Fisher diagonal [out, in], its scale to a mean KL)
        self.fisher: dict[str, dict[str, tuple[Any, float]]] = {name: {} for name in self.linears}
        for index, (set_name, probes) in enumerate(sets.items()):
            if probes:
                for chunk in self._chunks():
                    # every chunk of layers sees the same draws: as if summed in one pass
                    self._collect(model, set_name, probes, chunk, seed + index)

    def _chunks(self) -> list[list[str]]:
        """The layers whose Fisher one pass over a probe set sums: all of them, or where the
        Fisher goes to host memory (`compact`), runs of them whose float32 sums fit in
        FISHER_SHARE of the memory free now (at 8B one set's float32 sums are 28 GB: beside
        the float32 model, 28 GB more, and a batch's activations they ran an 80 GB H100 out
        of memory), each run a forward and `DRAWS` backward passes of its own."""
        names = sorted(self.linears)
        if not self.compact:
            return [names]
        room = max(1, int(FISHER_SHARE * _free_memory(self.device)) // 4)
        chunks: list[list[str]] = [[]]
        held = 0
        for name in names:
            size = self.linears[name].weight.numel()
            if chunks[-1] and held + size > room:
                chunks.append([])
                held = 0
            chunks[-1].append(name)
            held += size
        return chunks

    def _collect(self, model: Any, set_name: str, probes: list[Probe], chunk: list[str], seed: int) -> None:
        import torch

        inputs: dict[str, Any] = {}
        outputs: dict[str, Any] = {}

        def keep(name: str) -> Any:
            def hook(module: Any, args: tuple, output: Any) -> None:
                inputs[name] = args[0].detach()
                outputs[name] = output
            return hook

        generator = torch.Generator(device=self.device).manual_seed(seed)
        fisher: dict[str, Any] = {name: 0.0 for name in chunk}
        scored_positions = 0
        handles = [self.linears[name].register_forward_hook(keep(name)) for name in chunk]
        try:
            for group in _groups(probes):
                ids, mask, scored = _padded(group, self.device)
                with torch.enable_grad():
                    # gradients flow from the embeddings on (the weights themselves need none)
                    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                    logits = model(inputs_embeds=embeds, attention_mask=mask).logits.float()[scored]
                    probabilities = torch.softmax(logits.detach(), dim=-1)
                    root = probabilities.sqrt()
                    names = sorted(outputs)
                    for _ in range(DRAWS):
                        signs = torch.randint(0, 2, root.shape, generator=generator, device=self.device)
                        projected = root * (2.0 * signs - 1.0)
                        direction = projected - probabilities * projected.sum(dim=-1, keepdim=True)
                        grads = torch.autograd.grad((direction * logits).sum(), [outputs[n] for n in names],
                                                    retain_graph=True)
                        for name, grad in zip(names, grads):
                            fisher[name] = fisher[name] + _squared_per_sequence(grad.float(), inputs[name].float())
                scored_positions += int(scored.sum())
                inputs.clear()
                outputs.clear()
        finally:
            for handle in handles:
                handle.remove()
        scale = 1.0 / (2.0 * DRAWS * max(1, scored_positions))
        for name in chunk:
            kept = fisher[name].to(device="cpu", dtype=torch.bfloat16) if self.compact else fisher[name]
            fisher[name] = None
            self.fisher[name][set_name] = (kept, scale)

    def error(self, layer: str, weight: Any, sample: Optional[RowSample] = None) -> dict[str, float]:
        """Each probe set's estimated KL with `layer` at `weight`: every row of it, or the rows of
        `sample` (then `weight` holds those rows only), each counted by its sample weight."""
        import torch

        rows = counted = None
        original = self.original[layer].to(device=self.device, dtype=torch.float32)
        if sample is not None:
            rows = torch.as_tensor(sample.rows[layer], device=self.device)
            counted = torch.as_tensor(sample.weights[layer], dtype=torch.float32, device=self.device)
            original = original[rows]
        delta = (torch.as_tensor(weight, dtype=torch.float32, device=self.device) - original).pow(2)
        result = {}
        for name, (fisher, scale) in self.fisher[layer].items():
            stored = fisher if rows is None else fisher[rows.to(fisher.device)]
            per_row = (stored.to(device=self.device, dtype=torch.float32) * delta).sum(dim=1)
            result[name] = float(per_row.sum() if counted is None else (per_row * counted).sum()) * scale
        return result

    def influence(self) -> dict[str, Any]:
        """Per layer, how much each row's quantization error can weigh: its share of the
        layer's sum over inputs of Fisher x weight^2 on each probe set, the largest over the
        sets (a family's few answer positions can rest on rows the others barely use)."""
        import torch

        found = {}
        for layer, sets in self.fisher.items():
            squared = self.original[layer].to(device=self.device, dtype=torch.float32).pow(2)
            share = torch.zeros(squared.shape[0], dtype=torch.float64, device=self.device)
            for fisher, _ in sets.values():
                per_row = (fisher.to(device=self.device, dtype=torch.float32) * squared).sum(dim=1).double()
                share = torch.maximum(share, per_row / per_row.sum().clamp_min(1e-300))
            found[layer] = share.cpu().numpy()
        return found


def _exact_compact(weight: Any) -> Any:
    """`weight` in host memory, in bfloat16 or float16 where that holds every value exactly,
    else in float32."""
    import torch

    weight = weight.cpu()
    for dtype in (torch.bfloat16, torch.float16):
        narrow = weight.to(dtype)
        if torch.equal(narrow.float(), weight.float()):
            return narrow
    return weight.float()


def _squared_per_sequence(grad: Any, inputs: Any) -> Any:
    """The sum over sequences of each sequence's squared gradient with respect to the weight
    (of one draw's projected logits; [out, in]; `grad` [b, t, out], `inputs` [b, t, in]), formed
    PER_SEQUENCE_BYTES at a time: one [b, out, in] product for a group of 36 sequences at
    an 8B model's MLP is 8.5 GiB."""
    import torch

    step = max(1, PER_SEQUENCE_BYTES // (4 * grad.shape[-1] * inputs.shape[-1]))
    total = 0.0
    for start in range(0, grad.shape[0], step):
        part = torch.einsum("btj,btc->bjc", grad[start:start + step], inputs[start:start + step])
        total = total + part.pow(2).sum(dim=0)
    return total


def _free_memory(device: str) -> int:
    """Bytes free on `device`: the GPU's, or the host's available memory."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _padded(probes: list[Probe], device: str) -> tuple[Any, Any, Any]:
    """(token IDs, attention mask, scored positions) of `probes`, right-padded to the longest."""
    import torch

    width = max(len(p.ids) for p in probes)
    ids = torch.zeros((len(probes), width), dtype=torch.long)
    mask = torch.zeros((len(probes), width), dtype=torch.long)
    scored = torch.zeros((len(probes), width), dtype=torch.bool)
    for row, probe in enumerate(probes):
        ids[row, : len(probe.ids)] = torch.tensor(probe.ids)
        mask[row, : len(probe.ids)] = 1
        scored[row, probe.first: len(probe.ids) - 1] = True
    return ids.to(device), mask.to(device), scored.to(device)


def measure_of(config: SensitivityConfig, parameters: int) -> str:
    """The measure a model of `parameters` decoder weights is planned with: the configured
    one, or under `auto` the weight-space measure from `auto_weight_error_params` up."""
    if config.measure != AUTO:
        return config.measure
    return WEIGHT_ERROR if parameters >= config.auto_weight_error_params else KL


def measure(baseline: Path, calibration: list[list[int]], variants: dict[str, Any], config: SensitivityConfig,
            gguf_base: Optional[Path], log: Any = None, imatrix: Optional[Path] = None,
            keep: Optional[Path] = None) -> dict[str, dict]:
    """Per variant: {"variant", "candidates", "probes", "measure", "layers": {layer:
    {"weights", "kld": {candidate: {"calibration": x, family: y, ...}}}}}; a stub for
    variants that plan nothing. Under the weight-space measure the "kld" values are
    importance-weighted squared weight errors (`_Importance`), on the same probe sets.
    `keep`: a folder where each llama.cpp candidate's quantized file stays (`gguf_weights`), else
    each is removed once scored."""
    from transformers import AutoTokenizer

    from quantbuild.quantizers import model_layers

    layers = model_layers(baseline)
    parameters = sum(out * inp for out, inp in layers.values())
    measured_with = measure_of(config, parameters)
    planned = {name: candidates_of(variant) for name, variant in sorted(variants.items())}
    unique: dict[tuple, tuple[Candidate, Any]] = {}
    for name, candidates in planned.items():
        for candidate in candidates:
            unique.setdefault((candidate.format, candidate.key, candidate.gptq), (candidate, variants[name]))
    tables: dict[str, dict] = {}
    probes_record: dict = {}
    fisher: dict[str, str] = {}
    if unique:
        tokenizer = AutoTokenizer.from_pretrained(str(baseline))
        sets = probe_sets(tokenizer, calibration, config)
        probes_record = probes_digest(sets)
        scorer = _Scorer(baseline, sets) if measured_with == KL else _Importance(baseline, sets)
        score = scorer.kld if measured_with == KL else scorer.error
        if measured_with == WEIGHT_ERROR:
            fisher = {"fisher": scorer.storage}
        # a sample of rows where the weight-space measure scores a large model's llama.cpp types
        # (not where plans are checked whole: that needs every candidate's whole file)
        sampling = (measured_with == WEIGHT_ERROR and config.row_stride > 1 and keep is None
                    and parameters >= config.sample_rows_params)
        orientation, sample, thumbnail = None, None, None
        with tempfile.TemporaryDirectory(prefix="quantbuild-sensitivity-") as scratch:
            for key, (candidate, variant) in sorted(unique.items()):
                started = time.perf_counter()
                if candidate.format == "gguf":
                    if orientation is None:  # read off the base GGUF once for every candidate type
                        from quantbuild.quantizers.gguf import gguf_names

                        names = gguf_names(baseline, layers)
                        orientation = gguf_layer_orientation(baseline, gguf_base, names)
                    if sampling and sample is None:  # one thumbnail of the base for every type
                        sample = RowSample(scorer.influence(), config.row_stride, orientation)
                        thumbnail = sample.thumbnail(require_base(gguf_base), names, Path(scratch) / "rows.gguf")
                    weights = gguf_weights(candidate, baseline, gguf_base, layers, keep or Path(scratch), orientation,
                                           imatrix, source=thumbnail)
                else:
                    weights = gptq_weights(candidate, variant, baseline, calibration, Path(scratch))
                if sample is not None and candidate.format == "gguf":
                    tables[key] = {layer: scorer.error(layer, weights[layer], sample) for layer in layers}
                else:
                    tables[key] = {layer: score(layer, weights[layer]) for layer in layers}
                # (at 8B each file is 4-9 GB; its map goes first: the disk is freed when both are gone)
                scored = weights.path if isinstance(weights, Dequantized) and keep is None else None
                del weights
                if scored is not None:
                    scored.unlink()
                if log:
                    log(f"sensitivity {candidate.key}: {len(layers)} layers in {time.perf_counter() - started:.1f} s")
    results = {}
    for name, candidates in planned.items():
        if not candidates:
            results[name] = {"variant": name, "planned": False}
            continue
        results[name] = {
            "variant": name, "planned": True, "format": candidates[0].format, "measure": measured_with, **fisher,
            **({"row_sample": sample.record()} if sample is not None and candidates[0].format == "gguf" else {}),
            "candidates": [c.key for c in candidates],
            "probes": probes_record, "probe_settings": {"samples": config.samples,
                                                        "family_tokens": config.family_tokens},
            "layers": {layer: {"weights": out * inp,
                               "kld": {c.key: {k: _significant(v) for k, v in
                                               tables[(c.format, c.key, c.gptq)][layer].items()}
                                       for c in candidates}}
                       for layer, (out, inp) in layers.items()},
        }
    return results


def write_sensitivity(baseline: Path, calibration: list[list[int]], variants: dict[str, Any],
                      config: SensitivityConfig, gguf_base: Optional[Path], out: Path, log: Any = None,
                      imatrix: Optional[Path] = None) -> dict:
    from quantbuild.quantizers import model_layers
    from quantbuild.quantizers.gguf import nest_plans

    started = time.perf_counter()
    checked = config.check_stretches > 0 and any(variant.method == "gguf" and candidates_of(variant)
                                                 for variant in variants.values())
    with tempfile.TemporaryDirectory(prefix="quantbuild-plan-check-") as kept:
        results = measure(baseline, calibration, variants, config, gguf_base, log, imatrix,
                          keep=Path(kept) if checked else None)
        if any(table["planned"] for table in results.values()):
            layers = model_layers(baseline)
            check = _plan_checks(baseline, calibration, config, gguf_base, layers, Path(kept)) if checked else None
            nest_plans(variants, results, baseline, layers, check)
    with staged_dir(out) as staging:
        files = {}
        for name, table in results.items():
            write_json(staging / f"{name}.json", table)
            files[name] = {"planned": table["planned"], "sha256": sha256_file(staging / f"{name}.json")}
            if table.get("check"):
                steps = table["check"]["steps"]
                files[name]["check"] = {"judged": len(steps), "kept": sum(step["kept"] for step in steps)}
        measures = sorted({table["measure"] for table in results.values() if table["planned"]})
        record = {"variants": files, "measure": measures[0] if len(measures) == 1 else measures,
                  "samples": config.samples, "family_tokens": config.family_tokens,
                  "family_seed": FAMILY_SEED, "check_stretches": config.check_stretches,
                  "wall_seconds": round(time.perf_counter() - started, 1)}
        write_json(staging / RECORD, record)
    return record


# Candidates' dequantized weights are kept in memory for checking plans while they fit in this
# many bytes; beyond it each check reads them from the quantized files again.
CHECK_CACHE_BYTES = 2 << 30


def _plan_checks(baseline: Path, calibration: list[list[int]], config: SensitivityConfig, gguf_base: Path,
                 layers: dict, kept: Path) -> Callable[[], PlanCheck]:
    """Makes each auto-mix's judge of whole plans (quantizers.planner.PlanCheck): the plan's
    layers at their candidates' quantized weights (the files `measure` kept in `kept`) all at
    once, scored by KL divergence on the check probes (`probes.check_sets`, held out from the
    table's). A layer at a fixed type (an override: not a candidate) keeps its baseline
    weight, the same in every plan compared."""
    from transformers import AutoTokenizer

    from quantbuild.quantizers.gguf import gguf_names

    sets = check_sets(AutoTokenizer.from_pretrained(str(baseline)), calibration, config)
    scorer = _Scorer(baseline, sets, every_block=False)
    names = gguf_names(baseline, layers)
    orientation = gguf_layer_orientation(baseline, gguf_base, names)
    cache = sum(out * inp for out, inp in layers.values()) * 4 * len(list(kept.glob("*.gguf"))) <= CHECK_CACHE_BYTES
    read: dict[str, dict[str, Any]] = {}

    def weights_at(key: str, wanted: list[str]) -> dict[str, Any]:
        if key not in read:
            loaded = Dequantized(kept / f"{key}.gguf", {layer: names[layer] for layer in (layers if cache else wanted)},
                                 orientation)
            if not cache:
                return loaded
            read[key] = dict(loaded)
        return {layer: read[key][layer] for layer in wanted}

    def measure_plan(plan: dict[str, Level]) -> dict[str, float]:
        by_key: dict[str, list[str]] = {}
        for layer, level in sorted(plan.items()):
            if level.key:
                by_key.setdefault(level.key, []).append(layer)
        weights = {layer: weight for key, wanted in sorted(by_key.items())
                   for layer, weight in weights_at(key, wanted).items()}
        return scorer.swapped(weights) if weights else {name: 0.0 for name in sets}
    digest = probes_digest(sets)
    return lambda: PlanCheck(config.check_stretches, measure_plan, {"sets": digest, "seed": PLAN_CHECK_SEED})


def load_sensitivity(folder: Path, variant: str) -> Optional[dict]:
    """The variant's sensitivity table with the file's sha256, or None where none was measured."""
    path = folder / f"{variant}.json"
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    if not table.get("planned"):
        return None
    return {**table, "sha256": sha256_file(path)}
