"""The one interface every deploy runtime offers the suites.

Evaluation, the behavioural probes, `verify --behaviour` and the reports reach a model only
through a `Runtime`: an artifact loaded the way a user deploys it (a GGUF file in llama.cpp,
a checkpoint folder in transformers with GPTQModel's or bitsandbytes' kernels). A runtime
is opened from a `LoadSpec` by `open_runtime`, which finds the adapter module registered
for the spec's runtime; a new runtime is one adapter module with an `open(spec)` function,
its entry in `ADAPTERS`, and its settings in the config.

Token IDs are the runtime's own: each adapter tokenizes with the tokenizer the deployed
artifact carries (llama.cpp's vocabulary for a GGUF, the checkpoint's tokenizer otherwise).
Text rendered through a chat template is tokenized with its special tokens parsed as
tokens (`special=True`), as llama-server does; raw text reads them as text.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterator, Optional, Protocol

LLAMA_CPP = "llama.cpp"
TORCH = "torch"
# runtime -> the module whose `open(spec)` loads an artifact on it
ADAPTERS = {LLAMA_CPP: "quantbuild.runtimes.llama_cpp", TORCH: "quantbuild.runtimes.torch_stack"}


@dataclass(frozen=True)
class LoadSpec:
    """How to load one artifact on one runtime; every field a runtime does not use is
    ignored by it. Equal specs load equal models, so a spec is also what a record names."""

    runtime: str
    # a GGUF file (llama.cpp) or a checkpoint folder (torch)
    artifact: Path
    # llama.cpp: KV-cache type, CPU weight repacking, threads (0 = one per core), context
    kv_type: str = "f16"
    repack: bool = False
    threads: int = 0
    n_ctx: int = 256
    # torch: how quantized layers run (kernel | dequantized), the device, the GPU kernel
    # of each checkpoint format, and the batch of prompts one forward pass takes
    load_runtime: str = "kernel"
    device: str = "cpu"
    kernels: dict = field(default_factory=dict)
    batch_size: int = 32


@dataclass(frozen=True)
class Completion:
    """One greedy completion: its text (control tokens removed) and whether it ended at an
    end-of-generation token (EOS or the template's end of turn) rather than the budget."""

    text: str
    stopped: bool


@dataclass(frozen=True)
class ChatFormat:
    """What an artifact carries for chat: its template (None for a base model) and the
    special-token strings the template may refer to."""

    template: Optional[str]
    bos_token: str = ""
    eos_token: str = ""


@dataclass(frozen=True)
class Timing:
    """One timed greedy run: prefill plus the first token, then seconds per decoded token."""

    ttft_s: float
    decode_s_per_token: float


class Runtime(Protocol):
    """An artifact loaded as deployed. Use it as a context manager; `close` frees it."""

    name: str
    # the vocabulary the runtime's tokenizer and output layer share
    n_vocab: int

    def __enter__(self) -> "Runtime": ...

    def __exit__(self, *exc: object) -> None: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        """What an evaluation record says of this runtime: {"deploy_runtime", "runtime"
        (the quality load path), and the runtime's own block (device, kernels, KV type,
        threads)}."""

    def probe_settings(self) -> dict[str, Any]:
        """The settings the behavioural probes are recorded with, and `verify` reopens
        the artifact with."""

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token IDs with the runtime's special tokens (BOS where the model has one);
        `special` parses special-token text (`<|im_end|>`) as the tokens."""

    def bos_token(self) -> Optional[int]: ...

    def logprobs(self, tokens: list[int]) -> Any:
        """Log-probabilities [len(tokens) - 1, n_vocab] of each next token: a float32 numpy
        array, whatever device the model runs on (no runtime's framework crosses the
        protocol: a llama.cpp process never loads torch)."""

    def text_positions(self, texts: list[str]) -> Iterator[tuple[Any, Any]]:
        """(log-probabilities [P, vocab] float32, next-token targets [P] int64) numpy arrays
        over `texts`, each tokenized with its special tokens, batched as the runtime batches
        best."""

    def complete(self, prompts: list[str], max_new_tokens: int, special: bool = False) -> list[Completion]:
        """Greedy completions of `prompts` (control tokens removed), in order; `special` as
        in `tokenize`."""

    def generate(self, tokens: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `tokens`, stopping at an end-of-generation token."""

    def reserve(self, tokens: int) -> None:
        """Make room for sequences of up to `tokens` tokens (prompt and generation)."""

    def timed(self, tokens: list[int], new_tokens: int) -> Timing: ...

    def memory(self, context_lengths: list[int], budget_mb: float) -> dict[str, Any]:
        """Model memory by context length as the runtime reports it (weights, KV cache at
        its real type, buffers), KV bytes per token, and the context where the budget ends."""

    def at_threads(self, threads: int, tokens: int = 256) -> ContextManager["Runtime"]:
        """The same artifact computing with `threads` CPU threads, while open, with room
        for sequences of `tokens` tokens."""


def open_runtime(spec: LoadSpec) -> Runtime:
    """Load `spec.artifact` on `spec.runtime` through its adapter."""
    from quantbuild.errors import RuntimeUnavailable

    if spec.runtime not in ADAPTERS:
        raise RuntimeUnavailable(f"runtime {spec.runtime!r}: unknown (known: {', '.join(ADAPTERS)})")
    return importlib.import_module(ADAPTERS[spec.runtime]).open(spec)


def chat_format(spec: LoadSpec) -> ChatFormat:
    """The chat template `spec.artifact` carries, read from the file without loading it."""
    return importlib.import_module(ADAPTERS[spec.runtime]).chat_format(spec.artifact)


def sequence_positions(runtime: Runtime, sequences: list[list[int]]) -> Iterator[tuple[Any, Any]]:
    """(log-probabilities [P, vocab], next-token targets [P]) per token sequence, one
    sequence at a time (no padding), on any runtime."""
    import numpy as np

    for tokens in sequences:
        yield runtime.logprobs(tokens), np.asarray(tokens[1:], dtype=np.int64)
