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
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from quantbuild.errors import ConfigError, IntegrityError, QuantbuildError, RuntimeUnavailable

PACKAGE = "llama-cpp-python"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
# llama.cpp's KV-cache types a variant may ship with; quantized V needs flash attention.
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
# ISA flags of the CPUs whose repack path crashed here (see the module docstring).
REPACK_UNSAFE_ISA = ("amx_int8", "amx_bf16", "amx_tile", "avx512f")



def version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise RuntimeUnavailable(f"llama.cpp: {PACKAGE} is not installed (run `make install`)") from None


def home() -> Path:
    """Where `make install` built llama.cpp: `<venv>/llama.cpp`."""
    return Path(sys.prefix) / "llama.cpp"


def sdist_dir() -> Path:
    """The extracted llama-cpp-python sdist `make install` built from (exactly one)."""
    found = sorted(home().glob("llama_cpp_python-*/"))
    if len(found) != 1:
        raise RuntimeUnavailable(f"llama.cpp: expected one built llama-cpp-python source under {home()}, found "
                                 f"{len(found)} (run `make install`)")
    return found[0]


def source_dir() -> Path:
    """The vendored llama.cpp tree (converter, gguf-py) of the pinned sdist."""
    path = sdist_dir() / "vendor" / "llama.cpp"
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise RuntimeUnavailable(f"llama.cpp: the converter is missing at {path} (run `make install`)")
    return path


def tool(name: str) -> Path:
    path = home() / "build" / "bin" / name
    if not path.is_file():
        raise RuntimeUnavailable(f"llama.cpp: {name} is not built at {path} (run `make install`)")
    return path


def vendored_commit() -> str:
    """The llama.cpp commit the pinned sdist vendors, as its changelog names it."""
    try:
        changelog = sdist_dir() / "CHANGELOG.md"
    except RuntimeUnavailable:
        return "unknown"
    if changelog.is_file():
        found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", changelog.read_text(encoding="utf-8"))
        if found:
            return found.group(1)
    return "unknown"


def repack_allowed(isa: list[str]) -> bool:
    return not any(flag in isa for flag in REPACK_UNSAFE_ISA)


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
            "gguf_py": _gguf_py_version(), "backend": features, "repack": repack_allowed(isa),
            "repack_reason": "llama.cpp default" if repack_allowed(isa)
            else "off: the CPU repack path crashed on AMX/AVX-512 CPUs"}


def _gguf_py_version() -> str:
    try:
        return metadata.version("gguf")
    except metadata.PackageNotFoundError:
        return "absent"


def run_tool(name: str, args: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a llama.cpp tool; its output is returned (and kept out of the user's terminal).
    A failure is one line naming `what` and the tool's last error line."""
    command = [str(tool(name)), *args]
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", cwd=cwd)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if re.search(r"error|failed|invalid|unknown", line, re.IGNORECASE)]
        detail = (errors or lines or [f"exit code {result.returncode}"])[-1].strip()
        if result.returncode < 0:
            detail = f"killed by signal {-result.returncode}; {detail}"
        raise QuantbuildError(f"{what}: {name} failed: {detail}")
    return output


# --- the bindings -------------------------------------------------------------------------

_LOG: list[str] = []
_LOG_CALLBACK: Any = None


def require_available() -> None:
    """Raise RuntimeUnavailable, naming what is missing, unless this machine can run the
    llama.cpp target: the pinned bindings load and the tools are built."""
    for name in TOOLS:
        tool(name)
    _bindings()


def _bindings() -> Any:
    """llama_cpp's low-level API, with llama.cpp's log captured instead of printed."""
    global _LOG_CALLBACK
    version()
    try:
        import llama_cpp
    except (ImportError, OSError) as err:
        raise RuntimeUnavailable(f"llama.cpp: the bindings do not load ({err}; run `make install`)") from None
    if _LOG_CALLBACK is None:
        @llama_cpp.llama_log_callback
        def collect(level: int, text: bytes, user_data: Any) -> None:
            _LOG.append(text.decode("utf-8", errors="replace"))

        _LOG_CALLBACK = collect
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def system_info() -> str:
    return _bindings().llama_print_system_info().decode()


BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB")


def _buffers(lines: list[str]) -> dict[str, float]:
    """MiB per buffer kind (weights, kv_cache, compute, output) as llama.cpp logged them."""
    kinds = {"model": "weights", "KV": "kv_cache", "compute": "compute", "output": "output", "RS": "recurrent"}
    sizes: dict[str, float] = {}
    for line in "".join(lines).splitlines():
        match = BUFFER_LINE.search(line)
        if match:
            kind = kinds[match.group(2)]
            sizes[kind] = round(sizes.get(kind, 0.0) + float(match.group(3)), 3)
    return sizes


@dataclass
class Timing:
    ttft_s: float
    decode_s_per_token: float


class LlamaCppModel:
    """One GGUF file loaded in llama.cpp with one context of `n_ctx` tokens.

    Token log-probabilities, greedy generation, timed prefill/decode and the model's memory
    (weights, KV cache at `kv_type`, compute buffers) as llama.cpp reports it.
    """

    def __init__(self, path: Path, n_ctx: int = 2048, kv_type: str = "f16", threads: int = 2,
                 repack: bool = False) -> None:
        lib = self._lib = _bindings()
        if kv_type not in KV_TYPES:
            raise ConfigError(f"llama.cpp: kv cache type {kv_type!r} is not allowed (allowed: {' | '.join(KV_TYPES)})")
        from quantbuild.runtimes.gguf_file import layout

        layout(path)  # a malformed header or a tensor past the end is one line here, not a crash in C
        start = len(_LOG)
        params = lib.llama_model_default_params()
        params.use_extra_bufts = repack
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            detail = next((line.strip() for line in reversed(_LOG[start:]) if line.strip()), "no detail")
            raise IntegrityError(f"{path}: llama.cpp cannot load this GGUF file ({detail})")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        context = lib.llama_context_default_params()
        context.n_ctx = context.n_batch = context.n_ubatch = n_ctx
        context.n_threads = context.n_threads_batch = threads
        context.type_k = context.type_v = KV_TYPES[kv_type]
        if kv_type != "f16":
            context.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        context.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, context)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise QuantbuildError(f"{path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.n_ctx = n_ctx
        self.buffers = _buffers(_LOG[start:])
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._lib.llama_batch_free(self.batch)
            self._lib.llama_free(self.ctx)
            self._lib.llama_model_free(self.model)
            self.ctx = None

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        tokens = (self._lib.llama_token * room)()
        count = self._lib.llama_tokenize(self.vocab, data, len(data), tokens, room, add_special, False)
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

    def _decode(self, tokens: list[int], start: int, all_logits: bool) -> None:
        if start + len(tokens) > self.n_ctx:
            raise QuantbuildError(f"llama.cpp: {start + len(tokens)} tokens exceed the context of {self.n_ctx}")
        batch = self.batch
        batch.n_tokens = len(tokens)
        for index, token in enumerate(tokens):
            batch.token[index] = token
            batch.pos[index] = start + index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = 0
            batch.logits[index] = all_logits or index == len(tokens) - 1
        if self._lib.llama_decode(self.ctx, batch) != 0:
            raise QuantbuildError("llama.cpp: decode failed")

    def _reset(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)

    def _logits(self, rows: int) -> Any:
        import numpy as np

        pointer = self._lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self.n_vocab)).copy()

    def logprobs(self, tokens: list[int]) -> Any:
        """Log-probabilities [len(tokens) - 1, vocab] of each next token, float32."""
        import numpy as np

        self._reset()
        self._decode(tokens, 0, all_logits=True)
        logits = self._logits(len(tokens))[:-1].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logits -= np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        return logits.astype(np.float32)

    def _next(self) -> int:
        """The argmax token of the last decoded position."""
        import numpy as np

        pointer = self._lib.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).argmax())

    def generate(self, tokens: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation (argmax), stopping at an end-of-generation token."""
        self._reset()
        self._decode(tokens, 0, all_logits=False)
        generated: list[int] = []
        position = len(tokens)
        for _ in range(max_new_tokens):
            token = self._next()
            if self._lib.llama_vocab_is_eog(self.vocab, token):
                break
            generated.append(token)
            if len(generated) == max_new_tokens or position >= self.n_ctx:
                break
            self._decode([token], position, all_logits=False)
            position += 1
        return generated

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


def memory_at(path: Path, n_ctx: int, kv_type: str, threads: int, repack: bool) -> dict[str, float]:
    """The buffers llama.cpp allocates for `path` with a context of `n_ctx` tokens (MiB)."""
    with LlamaCppModel(path, n_ctx, kv_type, threads, repack) as model:
        return dict(model.buffers)


def positions(model: LlamaCppModel, sequences: list[list[int]]) -> Iterator[tuple[Any, Any]]:
    """(log-probabilities [P, vocab], next-token targets [P]) per sequence, as torch tensors,
    in the same layout as the torch runtime's `position_logprobs`."""
    import torch

    for tokens in sequences:
        yield torch.from_numpy(model.logprobs(tokens)), torch.tensor(tokens[1:], dtype=torch.long)
