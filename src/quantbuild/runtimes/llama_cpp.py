"""llama.cpp, built from the one pinned source: the llama-cpp-python sdist's vendored tree.

`make install` builds that tree once into `<venv>/llama.cpp/` (shared libraries the Python
bindings load, and the llama-quantize / llama-imatrix / llama-perplexity tools) and
installs the bindings without a second build, so the converter, the quantizer, the tools
and the runtime quantbuild evaluates with are the same llama.cpp.

Weight repacking: on CPUs with AMX or AVX-512, llama.cpp's CPU repack path (extra buffer
types) crashed here (SIGSEGV/SIGILL) for Q4_0, Q4_K, Q5_K, Q6_K, Q8_0 and IQ4_XS while
loading. quantbuild therefore loads without repacking on those CPUs (`use_extra_bufts =
False`, `--no-repack` for the tools) and keeps llama.cpp's default elsewhere; the choice is
part of the llama.cpp fingerprint, so a change of it is drift.

Devices: a model runs on the CPU or, where the build has the CUDA backend and a GPU is
visible, on one CUDA GPU with every layer offloaded and flash attention on (the deploy
target `llama.cpp-cuda`, as `llama-server -ngl 99 -fa on` runs it). A CPU run uses no GPU at
all, even on a CUDA build: left to its defaults, llama.cpp would still send large-batch
matrix products of CPU-resident weights to the GPU (`op_offload`), so the CPU numbers
would depend on the GPU beside it.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

from quantbuild.errors import ConfigError, IntegrityError, QuantbuildError, RuntimeUnavailable
from quantbuild.runtimes.gguf_file import layout, vocabulary_token
from quantbuild.runtimes.llama_bindings import LOG, bindings
from quantbuild.runtimes.llama_build import (TOOLS, build_backend, build_info, repack_allowed, sdist_dir, tool,
                                             vendored_commit, version)
from quantbuild.runtimes.protocol import LLAMA_CPP, ChatFormat, Completion, LoadSpec, Timing, sequence_positions

# llama.cpp's KV-cache types a variant may ship with; quantized V needs flash attention.
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
# The fewest leading tokens a batched prompt takes from the one before it instead of
# prefilling them (a copy of the whole KV stream costs about what a few tokens' prefill does).
SHARED_PREFIX = 16
DEVICES = ("cpu", "cuda")


def fingerprint(isa: list[str]) -> dict[str, Any]:
    """What can change llama.cpp's numbers besides the model: versions, build, dispatch."""
    try:
        llama_version, commit = version(), vendored_commit()
        built_from = sdist_dir().name
    except RuntimeUnavailable:
        return {"installed": False}
    try:
        # the compiled feature set (ISA paths, OpenMP, repack kernels): a rebuild with other
        # flags changes numbers while every version stays the same
        features = system_info().strip()
    except QuantbuildError:
        features = "unavailable"
    return {"installed": True, "llama_cpp_python": llama_version, "built_from": built_from, "llama_cpp_commit": commit,
            "gguf_py": _gguf_py_version(), "backend": features, "build": build_info(), "repack": repack_allowed(isa),
            "repack_reason": "llama.cpp default" if repack_allowed(isa)
            else "off: the CPU repack path crashed on AMX/AVX-512 CPUs"}


def _gguf_py_version() -> str:
    try:
        return metadata.version("gguf")
    except metadata.PackageNotFoundError:
        return "absent"


# --- the bindings (loaded by llama_bindings) ---------------------------------------------


def require_available() -> None:
    """Raise RuntimeUnavailable, naming what is missing, unless this machine can run the
    llama.cpp target: the pinned bindings load and the tools are built."""
    for name in TOOLS:
        tool(name)
    bindings()


def system_info() -> str:
    return bindings().llama_print_system_info().decode()


def devices() -> list[str]:
    """The devices this machine's llama.cpp runs a model on: the CPU, and "cuda" where the
    build has the CUDA backend and it sees a GPU."""
    return ["cpu"] if _cuda_unavailable() else ["cpu", "cuda"]


def fastest_device() -> str:
    """Where the pipeline's own llama.cpp measurements run (an auto-mix's validation): the
    GPU where this machine's llama.cpp has one, else the CPU. The machine's fingerprint
    names both the build and the GPU, so a plan validated on one is rebuilt, not reused, on
    the other."""
    return devices()[-1]


def check_device(device: str) -> None:
    """Raise ConfigError, in one line, for a device llama.cpp does not know."""
    if device not in DEVICES:
        raise ConfigError(f"llama.cpp: device {device!r} is not allowed (allowed: {' | '.join(DEVICES)})")


def require_device(device: str) -> None:
    """Raise ConfigError for a device llama.cpp does not know, and RuntimeUnavailable, in one
    line saying why, when this machine cannot run `device`."""
    check_device(device)
    reason = _cuda_unavailable() if device == "cuda" else None
    if reason:
        raise RuntimeUnavailable(f"target {LLAMA_CPP}-{device}: not available here ({reason})")


def _cuda_unavailable() -> Optional[str]:
    """Why llama.cpp cannot run on a CUDA GPU here, or None when it can."""
    if build_backend() != "cuda":
        return ("llama.cpp was built for the CPU only; `make install` builds the CUDA backend where nvcc and an "
                "NVIDIA GPU are present")
    # true once a GPU device is registered: the CUDA backend found one
    if not bindings().llama_supports_gpu_offload():
        return "no NVIDIA GPU is visible"
    return None


BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB")
BUFFER_KINDS = {"model": "weights", "KV": "kv_cache", "compute": "compute", "output": "output", "RS": "recurrent"}
# A GPU's own memory: llama.cpp names a buffer after its device (CUDA0, CUDA1); the others
# are host memory (CPU, CPU_Mapped, CPU_REPACK, and CUDA_Host: pinned, for transfers).
GPU_BUFFER = re.compile(r"CUDA\d+")


@dataclass(frozen=True)
class Buffers:
    """The memory llama.cpp allocated for one model and context, in MiB per kind (weights,
    kv_cache, compute, output): on the device it runs on, in host memory beside it (none on
    the CPU, where every buffer is the device's), and per buffer type."""

    device: dict[str, float]
    host: dict[str, float]
    types: dict[str, dict[str, float]]


def logged_buffers(lines: list[str], device: str) -> Buffers:
    """The buffers llama.cpp logged while loading on `device`. On a GPU its own buffers are
    the ones named after it (CUDA0); the rest (the input embeddings llama.cpp keeps on the
    CPU, pinned staging in CUDA_Host) is host memory."""
    found = []
    for line in "".join(lines).splitlines():
        match = BUFFER_LINE.search(line)
        if match:
            found.append((match.group(1), BUFFER_KINDS[match.group(2)], float(match.group(3))))
    mine = [device == "cpu" or GPU_BUFFER.fullmatch(name) is not None for name, _, _ in found]
    return Buffers(_by_kind([entry for entry, own in zip(found, mine) if own]),
                   _by_kind([entry for entry, own in zip(found, mine) if not own]),
                   {name: _by_kind([entry for entry in found if entry[0] == name])
                    for name in sorted({name for name, _, _ in found})})


def _by_kind(buffers: list[tuple[str, str, float]]) -> dict[str, float]:
    """MiB per kind, summed in the log's order."""
    sizes: dict[str, float] = {}
    for _, kind, size in buffers:
        sizes[kind] = round(sizes.get(kind, 0.0) + size, 3)
    return sizes


FLASH_ATTENTION_LINE = re.compile(r"Flash Attention (enabled|not supported)")


def _flash_attention(lines: list[str]) -> str:
    """How llama.cpp resolved flash attention "auto" for a context, from its log:
    "enabled", "disabled", or "auto" where it logged no choice."""
    found = FLASH_ATTENTION_LINE.findall("".join(lines))
    if not found:
        return "auto"
    return "enabled" if found[-1] == "enabled" else "disabled"


class LlamaCppModel:
    """One GGUF file loaded in llama.cpp with one context of `n_ctx` tokens: the `Runtime`
    protocol on llama.cpp (what a llama.cpp, Ollama or LM Studio user gets).

    Token log-probabilities, greedy generation (llama.cpp's tokenizer, sampler-free argmax),
    timed prefill/decode and the model's memory (weights, KV cache at `kv_type`, compute
    buffers) as llama.cpp's own log reports it.
    """

    name = LLAMA_CPP

    def __init__(self, path: Path, n_ctx: int = 2048, kv_type: str = "f16", threads: int = 2,
                 repack: bool = False, parallel: int = 1, device: str = "cpu") -> None:
        lib = self._lib = bindings()
        if kv_type not in KV_TYPES:
            raise ConfigError(f"llama.cpp: kv cache type {kv_type!r} is not allowed (allowed: {' | '.join(KV_TYPES)})")
        require_device(device)
        self.path, self.kv_type, self.threads, self.repack, self.device = path, kv_type, threads, repack, device
        # greedy completions decoded together: one KV sequence per prompt, one batch per step
        self.parallel = max(1, parallel)
        # prompt tokens this model's greedy generations prefilled, and took from a shared prefix instead
        self.prompt_tokens = {"prefilled": 0, "shared": 0}
        layout(path)  # a malformed header or a tensor past the end is one line here, not a crash in C
        start = len(LOG)
        params = lib.llama_model_default_params()
        params.use_extra_bufts = repack
        # one device: the first GPU, every layer and the output layer (a negative count: all)
        # on it; or none (no main GPU: llama.cpp clears the model's device list, as
        # `llama-cli --device none`), so no context of it schedules work on a GPU
        params.split_mode = lib.LLAMA_SPLIT_MODE_NONE
        params.n_gpu_layers, params.main_gpu = (-1, 0) if device == "cuda" else (0, -1)
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            detail = next((line.strip() for line in reversed(LOG[start:]) if line.strip()), "no detail")
            raise IntegrityError(f"{path}: llama.cpp cannot load this GGUF file ({detail})")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        try:
            self._open_context(n_ctx)
        except QuantbuildError:
            lib.llama_model_free(self.model)
            raise
        self.buffers = logged_buffers(LOG[start:], device)

    def _open_context(self, n_ctx: int, sequences: int = 1) -> None:
        """A context of `sequences` KV sequences of `n_ctx` tokens each, every sequence in
        its own KV stream (so a sequence's attention reads its cells exactly as it would
        alone), taking batches of up to max(n_ctx, sequences) tokens."""
        lib = self._lib
        context = lib.llama_context_default_params()
        context.n_ctx = n_ctx * sequences
        context.n_batch = context.n_ubatch = max(n_ctx, sequences)
        context.n_seq_max = sequences
        context.kv_unified = False
        context.n_threads = context.n_threads_batch = self.threads
        context.type_k = context.type_v = KV_TYPES[self.kv_type]
        # on the CPU, llama.cpp's own choice ("auto") unless the KV cache is quantized, which
        # needs flash attention; on a GPU always on, as llama.cpp's CUDA users run it
        if self.kv_type != "f16" or self.device == "cuda":
            context.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        context.no_perf = True
        start = len(LOG)
        self.ctx = lib.llama_init_from_model(self.model, context)
        if not self.ctx:
            raise QuantbuildError(f"{self.path}: llama.cpp could not create a context of {sequences} x {n_ctx} tokens")
        explicit = context.flash_attn_type == lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.flash_attention = "enabled" if explicit else _flash_attention(LOG[start:])
        self.n_ctx, self.sequences = n_ctx, sequences
        self.batch = lib.llama_batch_init(max(n_ctx, sequences), 0, 1)

    def _close_context(self) -> None:
        self._lib.llama_batch_free(self.batch)
        self._lib.llama_free(self.ctx)
        self.ctx = None

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._close_context()
            self._lib.llama_model_free(self.model)

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {"runtime": LLAMA_CPP, "deploy_runtime": LLAMA_CPP,
                "llama_cpp": {"device": self.device, "backend": build_backend(), "kv_cache_type": self.kv_type,
                              "flash_attention": self.flash_attention, "threads": self.threads,
                              "repack": self.repack, "parallel_sequences": self.parallel,
                              "prompt_tokens": dict(self.prompt_tokens)}}

    def probe_settings(self) -> dict[str, Any]:
        return {"kv_cache_type": self.kv_type, "repack": self.repack, "device": self.device,
                "flash_attention": self.flash_attention}

    def tokenize(self, text: str, special: bool = False, add_special: bool = True) -> list[int]:
        """llama.cpp's tokenizer: BOS where the vocabulary adds one (`add_special`), special
        tokens parsed where `special` (as llama-server parses a rendered chat)."""
        data = text.encode("utf-8")
        room = len(data) + 8
        tokens = (self._lib.llama_token * room)()
        count = self._lib.llama_tokenize(self.vocab, data, len(data), tokens, room, add_special, special)
        return list(tokens[:count])

    def detokenize(self, tokens: list[int]) -> str:
        pieces = bytearray()
        buffer = ctypes.create_string_buffer(256)
        for token in tokens:
            if self._lib.llama_vocab_is_control(self.vocab, token):
                continue
            size = self._lib.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
            pieces += buffer.raw[:size]
        return pieces.decode("utf-8", errors="replace")

    def _decode(self, tokens: list[int], start: int, all_logits: bool, sequence: int = 0) -> None:
        """Decode `tokens` of one sequence from position `start`."""
        if start + len(tokens) > self.n_ctx:
            raise QuantbuildError(f"llama.cpp: {start + len(tokens)} tokens exceed the context of {self.n_ctx}")
        self._submit([(token, start + index, sequence, all_logits or index == len(tokens) - 1)
                      for index, token in enumerate(tokens)])

    def _submit(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for index, (token, position, sequence, logits) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = logits
        if self._lib.llama_decode(self.ctx, batch) != 0:
            raise QuantbuildError("llama.cpp: decode failed")

    def _reset(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)

    def _logits(self, rows: int) -> Any:
        import numpy as np

        pointer = self._lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self.n_vocab)).copy()

    def bos_token(self) -> Optional[int]:
        return next(iter(self.tokenize("", add_special=True)), None)

    def logprobs(self, tokens: list[int]) -> Any:
        """Log-probabilities [len(tokens) - 1, vocab] of each next token, float32."""
        from quantbuild.evaluation.distributions import log_softmax

        self._reset()
        self._decode(tokens, 0, all_logits=True)
        return log_softmax(self._logits(len(tokens))[:-1])

    def text_positions(self, texts: list[str]) -> Iterator[tuple[Any, Any]]:
        return sequence_positions(self, [self.tokenize(text) for text in texts])

    def complete(self, prompts: list[str], max_new_tokens: int, special: bool = False) -> list[Completion]:
        """Greedy completions, `parallel` prompts at a time (in token order, so that prompts
        sharing a prefix are neighbours): each prompt prefilled into its own KV sequence, then
        one batch per step holding the next token of every sequence still generating. A
        prompt that begins with at least SHARED_PREFIX tokens of the one before it takes that
        prefix's KV cells from it (`_generate_together`), on the CPU the first prompt of a
        batch from the last of the batch before, whose KV stream is kept for it. Each output
        is the one `generate` gives for its prompt alone (a test compares every record)."""
        tokenized = [self.tokenize(prompt, special) for prompt in prompts]
        if self.parallel == 1 or len(prompts) == 1:
            return [self._completion(*self._generate_together([tokens], max_new_tokens)[0]) for tokens in tokenized]
        order = sorted(range(len(prompts)), key=lambda index: tokenized[index])
        per_sequence = _context_size(max(map(len, tokenized)) + max_new_tokens)
        outputs: list[Completion] = [Completion("", False)] * len(prompts)
        own = (self.n_ctx, self.sequences)
        self._close_context()
        self._open_context(per_sequence, min(self.parallel, len(prompts)))
        try:
            carried: Optional[tuple[int, list[int]]] = None
            for start in range(0, len(order), self.sequences):
                indices = order[start : start + self.sequences]
                group = [tokenized[index] for index in indices]
                generated = self._generate_together(group, max_new_tokens, carried)
                for index, (tokens, stopped) in zip(indices, generated):
                    outputs[index] = self._completion(tokens, stopped)
                # (on the CPU only: on CUDA a bench run with it aborted, not yet explained:
                # bench/README.md, "Prompts that share a prefix prefill it once")
                carried = (len(group) - 1, group[-1]) if self.device == "cpu" else None
        finally:
            self._close_context()
            self._open_context(*own)
        return outputs

    def _completion(self, tokens: list[int], stopped: bool) -> Completion:
        return Completion(self.detokenize(tokens), stopped)

    def _generate_together(self, prompts: list[list[int]], max_new_tokens: int,
                           carried: Optional[tuple[int, list[int]]] = None) -> list[tuple[list[int], bool]]:
        """Greedy continuations of `prompts` (at most `sequences`), each stopping at an
        end-of-generation token, the budget or the end of its context: every prompt
        prefilled into its own sequence, then one batch per step. Each with whether it
        stopped at an end-of-generation token.

        A prompt whose first SHARED_PREFIX or more tokens are the previous prompt's (a
        system prompt, a tool list) copies the previous sequence's KV stream, which holds
        that prompt (and past it, at most its own generated tokens), drops the cells past
        the shared prefix, and prefills only the rest, at the same cells and positions as
        if alone; at least its last token is always decoded, for its logits. `carried`
        (sequence, prompt): the previous batch's last prompt, whose KV stream the cache
        still holds, is the first prompt's previous one; every other stream is cleared
        when its sequence is reached."""
        if carried is None:
            self._reset()
        memory = self._lib.llama_get_memory(self.ctx)
        generated: list[list[int]] = [[] for _ in prompts]
        stopped = [False] * len(prompts)
        pending: dict[int, int] = {}  # sequence -> the token it decodes next
        positions = [len(tokens) for tokens in prompts]
        for sequence, tokens in enumerate(prompts):
            source, before = (sequence - 1, prompts[sequence - 1]) if sequence else (carried or (-1, []))
            shared = _shared_prefix(before, tokens)
            if shared:
                # across KV streams llama.cpp resets the destination's cells and copies the
                # whole stream (at the next decode, this prompt's own: before the source is
                # reached and cleared, where it is the carried one)
                self._lib.llama_memory_seq_cp(memory, source, sequence, -1, -1)
                self._lib.llama_memory_seq_rm(memory, sequence, shared, -1)
            elif carried is not None:
                self._lib.llama_memory_seq_rm(memory, sequence, -1, -1)
            self.prompt_tokens["prefilled"] += len(tokens) - shared
            self.prompt_tokens["shared"] += shared
            self._decode(tokens[shared:], shared, all_logits=False, sequence=sequence)
            self._accept(sequence, self._next(), generated, pending, positions, max_new_tokens, stopped)
        while pending:
            live = sorted(pending)
            self._submit([(pending[sequence], positions[sequence], sequence, True) for sequence in live])
            chosen = self._logits(len(live)).argmax(axis=-1)
            for sequence, token in zip(live, chosen):
                positions[sequence] += 1
                self._accept(sequence, int(token), generated, pending, positions, max_new_tokens, stopped)
        return list(zip(generated, stopped))

    def _accept(self, sequence: int, token: int, generated: list[list[int]], pending: dict[int, int],
                positions: list[int], max_new_tokens: int, stopped: list[bool]) -> None:
        """The stopping rules for one sequence's next token."""
        pending.pop(sequence, None)
        if max_new_tokens <= 0:
            return
        if self._lib.llama_vocab_is_eog(self.vocab, token):
            stopped[sequence] = True
            return
        generated[sequence].append(token)
        if len(generated[sequence]) < max_new_tokens and positions[sequence] < self.n_ctx:
            pending[sequence] = token

    def reserve(self, tokens: int) -> None:
        """A context of at least 256 tokens and `tokens` rounded up to a multiple of 256
        (the KV cache is allocated once, at its size)."""
        n_ctx = _context_size(tokens)
        if n_ctx > self.n_ctx:
            self._close_context()
            self._open_context(n_ctx)

    def _next(self) -> int:
        """The argmax token of the last decoded position."""
        import numpy as np

        pointer = self._lib.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).argmax())

    def generate(self, tokens: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation (argmax), stopping at an end-of-generation token."""
        return self._generate_together([tokens], max_new_tokens)[0][0]

    def timed(self, tokens: list[int], new_tokens: int) -> Timing:
        """Time to first token (prefill + first argmax) and decode seconds per token after it."""
        self._reset()
        started = time.perf_counter()
        self._decode(tokens, 0, all_logits=False)
        token = self._next()
        first = time.perf_counter() - started
        position = len(tokens)
        decode_started = time.perf_counter()
        for _ in range(new_tokens - 1):
            self._decode([token], position, all_logits=False)
            token = self._next()
            position += 1
        return Timing(first, (time.perf_counter() - decode_started) / max(1, new_tokens - 1))

    def memory(self, context_lengths: list[int], budget_mb: float) -> dict[str, Any]:
        """Model memory on the device by context length as llama.cpp allocates it (the file
        loaded afresh with a context of each length), KV bytes per token, and the memory
        cliff: the context where weights + KV + compute buffers cross the budget. On a GPU
        these are its own buffers (CUDA0), and `host_mb` the host memory beside them."""
        by_context, per_token, fixed = {}, 0.0, 0.0
        for length in sorted(context_lengths):
            allocated = buffers_at(self.path, length, self.kv_type, self.threads, self.repack, self.device)
            buffers = allocated.device
            total = sum(buffers.values())
            entry = {"peak_mb": round(total, 3), "kv_cache_mb": buffers.get("kv_cache", 0.0),
                     "weights_mb": buffers.get("weights", 0.0), "compute_mb": buffers.get("compute", 0.0),
                     "output_mb": buffers.get("output", 0.0)}
            if self.device != "cpu":
                entry.update(host_mb=round(sum(allocated.host.values()), 3), buffers_mb=allocated.types)
            by_context[str(length)] = entry
            per_token = buffers.get("kv_cache", 0.0) * 2**20 / length
            fixed = total - buffers.get("kv_cache", 0.0)
        cliff = int((budget_mb - fixed) * 2**20 // per_token) if per_token else None
        return {
            "device": self.device,
            "runtime": LLAMA_CPP,
            "kv_cache_type": self.kv_type,
            "artifact_mb": round(self.path.stat().st_size / 2**20, 3),
            "kv_cache_bytes_per_token": round(per_token),
            "by_context": by_context,
            "budget_mb": budget_mb,
            "memory_cliff_tokens": max(0, cliff) if cliff is not None else None,
        }

    @contextmanager
    def at_threads(self, threads: int, tokens: int = 256) -> Iterator["LlamaCppModel"]:
        """The file in a fresh context for sequences of `tokens` tokens (at least 256, in
        blocks of 256) at `threads` threads: the probes' own context, the same whatever
        context the evaluation needed."""
        with LlamaCppModel(self.path, _context_size(tokens), self.kv_type, threads, self.repack,
                           device=self.device) as model:
            yield model


def _shared_prefix(before: list[int], tokens: list[int]) -> int:
    """How many leading tokens of `tokens` to copy from `before`'s sequence: their common
    prefix, short of `tokens`' last token, where at least SHARED_PREFIX long, else 0."""
    limit = min(len(before), len(tokens) - 1)
    common = next((index for index in range(limit) if before[index] != tokens[index]), limit)
    return common if common >= SHARED_PREFIX else 0


def _context_size(tokens: int) -> int:
    """KV cells for sequences of `tokens` tokens: at least 256, in blocks of 256 (llama.cpp
    allocates the cache once, at its size)."""
    return max(256, -(-tokens // 256) * 256)


def chat_format(path: Path) -> ChatFormat:
    """The chat template in a GGUF file's `tokenizer.chat_template` (None when it has
    none), with its BOS and EOS token strings."""
    file = layout(path)
    template = file.values.get("tokenizer.chat_template")
    return ChatFormat(template if isinstance(template, str) else None,
                      vocabulary_token(file, path, file.values.get("tokenizer.ggml.bos_token_id")),
                      vocabulary_token(file, path, file.values.get("tokenizer.ggml.eos_token_id")))


def open(spec: LoadSpec) -> LlamaCppModel:
    """The GGUF file `spec.artifact` in llama.cpp on `spec.device` (`spec.threads` 0: one
    per core)."""
    return LlamaCppModel(spec.artifact, n_ctx=spec.n_ctx, kv_type=spec.kv_type,
                         threads=spec.threads or os.cpu_count() or 1, repack=spec.repack,
                         parallel=spec.batch_size, device=spec.device)


def buffers_at(path: Path, n_ctx: int, kv_type: str, threads: int, repack: bool, device: str = "cpu") -> Buffers:
    """The buffers llama.cpp allocates for `path` on `device` with a context of `n_ctx`
    tokens: on the device, on the host beside it, and per buffer type."""
    with LlamaCppModel(path, n_ctx, kv_type, threads, repack, device=device) as model:
        return model.buffers


def memory_at(path: Path, n_ctx: int, kv_type: str, threads: int, repack: bool,
              device: str = "cpu") -> dict[str, float]:
    """The buffers llama.cpp allocates on `device` for `path` with a context of `n_ctx`
    tokens (MiB per kind)."""
    return dict(buffers_at(path, n_ctx, kv_type, threads, repack, device).device)
