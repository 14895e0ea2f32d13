"""The baseline in llama.cpp's format, and the importance matrix GGUF variants use.

`base.gguf` is the pinned baseline converted by llama.cpp's converter (F16 by default): the
file every gguf variant is quantized from, and the baseline a llama.cpp ladder is measured
against. `imatrix.gguf` is llama-imatrix's importance matrix over the project's seeded
calibration mix, drawn to `calibration.imatrix_samples` samples: measured here, an imatrix
from the 48 calibration samples (7.9k tokens) made Q4_K_M worse than none, one from ~100k
tokens helped (bench/README.md). The text is no artifact: the record keeps its digest, token
count and composition only, and the text itself never outlives the run that reads it
(`private_folder` says how, SIGKILL included).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from quantbuild.config import CalibrationConfig
from quantbuild.gguf_artifacts import BASE_FILE, IMATRIX_FILE, IMATRIX_RECORD, RECORD, require_base
from quantbuild.hashing import sha256_bytes, sha256_file, staged_dir, write_json

# Where llama-imatrix reads the calibration text: a folder beside the matrix, so inside the
# stage's staging folder (`artifacts/.imatrix.partial`), never outside the repository. Its
# `.partial` name makes it staging debris wherever it sits: a run killed by SIGKILL leaves
# it, and the next start of any stage removes it (`hashing.remove_staging_debris`), as
# does the next `compute_imatrix` beside the same matrix.
TEXT_DIR = ".calibration-text.partial"
# Signals that end the process by default: while the text exists they unwind the stack
# instead (the imatrix subprocess is killed, the folder removed), then end it as before.
TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def build_base(baseline: Path, base_type: str, needed: bool, out: Path) -> dict[str, Any]:
    """Write `base.gguf` and the record into `out`.

    With `needed` false (the ladder has no gguf variant) only the record is written, so a
    ladder on another runtime neither converts nor depends on llama.cpp.
    """
    with staged_dir(out) as staging:
        if not needed:
            record: dict[str, Any] = {"converted": False, "reason": "no gguf variant in the ladder"}
            write_json(staging / RECORD, record)
            return record
        from quantbuild.runtimes.gguf_file import convert, known_pretokenizer, metadata, tensor_digest

        base = staging / BASE_FILE
        convert(baseline, base, base_type)
        record = {"converted": True, "base_type": base_type, "base_sha256": sha256_file(base),
                  "tensors_sha256": tensor_digest(base),
                  "pre_tokenizer": metadata(base).get("tokenizer.ggml.pre"),
                  "pre_tokenizer_named_by_quantbuild": known_pretokenizer(baseline / "tokenizer.json") is not None}
        write_json(staging / RECORD, record)
    return record


def build_imatrix(gguf_base: Path, tokenizer_dir: Path, calibration: CalibrationConfig, data_dir: Path, needed: bool,
                  repack: bool, out: Path) -> dict[str, Any]:
    """Write `imatrix.gguf` (llama-imatrix over `base.gguf` in `gguf_base`, checked against
    its record first) and the record into `out`; with `needed` false (no gguf variant
    uses an importance matrix), the record alone."""
    with staged_dir(out) as staging:
        record: dict[str, Any] = {"imatrix": None}
        if needed:
            record["imatrix"] = compute_imatrix(require_base(gguf_base), calibration, data_dir, tokenizer_dir, repack,
                                                staging / IMATRIX_FILE)
        write_json(staging / IMATRIX_RECORD, record)
    return record


def compute_imatrix(base: Path, calibration: CalibrationConfig, data_dir: Path, tokenizer_dir: Path, repack: bool,
                    out: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from quantbuild.calibration import draw_texts
    from quantbuild.runtimes.gguf_file import metadata
    from quantbuild.runtimes.llama_build import cores, run_tool

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts, composition = draw_texts(calibration, data_dir, calibration.imatrix_samples, tokenizer.chat_template)
    text = "\n\n".join(texts)
    tokens = len(tokenizer(text, verbose=False)["input_ids"])
    # conversations rendered through the chat template carry its special tokens as text
    chat = any(source["chat_template"] for source in composition.values())
    chunk = calibration.imatrix_chunk
    if tokens < 2 * chunk:
        from quantbuild.errors import DataError

        raise DataError(f"calibration: the imatrix mix has {tokens} tokens, fewer than two chunks of {chunk} "
                        f"(raise calibration.imatrix_samples or lower calibration.imatrix_chunk)")
    text_sha256 = sha256_bytes(text.encode("utf-8"))
    with private_folder(out.parent / TEXT_DIR) as folder:
        # llama-imatrix records the dataset's path in the matrix (and llama-quantize copies it
        # into every GGUF): a name from the text's digest, relative, keeps both reproducible.
        corpus = f"calibration-{text_sha256[:16]}.txt"
        (folder / corpus).write_text(text, encoding="utf-8")
        args = ["-m", str(base.resolve()), "-f", corpus, "-o", str(out.resolve()), "-c", str(chunk), "-b", str(chunk),
                "-t", str(cores()), "--no-ppl", "--output-frequency", "1000000"]
        if not repack:
            args.append("--no-repack")
        if chat:
            args.append("--parse-special")
        run_tool("llama-imatrix", args, "gguf importance matrix", cwd=folder)
    # The matrix records how many chunks it saw (llama.cpp's log is not a reliable source).
    used_chunks = int(metadata(out)["imatrix.chunk_count"])
    return {"sha256": sha256_file(out), "text_sha256": text_sha256, "tokens": tokens,
            "tokens_used": used_chunks * chunk, "chunks": used_chunks, "chunk_size": chunk,
            "samples": len(texts), "seed": calibration.seed, "composition": composition}


class _Terminated(BaseException):
    """A terminating signal, raised in the main thread so that every `finally` runs."""


@contextmanager
def private_folder(folder: Path) -> Iterator[Path]:
    """`folder`, empty (a stale one from a killed run is removed first), and removed again on
    every way out: return, exception, Ctrl-C (KeyboardInterrupt), and SIGTERM or SIGHUP,
    which while it exists raise in the main thread (a running subprocess is killed by
    `subprocess.run` on the way) and, once it is gone, end the process by that signal as
    they would have. SIGKILL cannot be caught: its folder stays until the next start."""
    received: list[int] = []
    closing = False

    def terminate(signum: int, frame: Any) -> None:
        from quantbuild.runtimes.llama_build import defer_signal

        if defer_signal(signum):  # a tool is starting: raised again once it can be killed
            return
        received.append(signum)
        if not closing and len(received) == 1:
            raise _Terminated(signum)

    replaced: dict[int, Any] = {}
    try:
        # Only the main thread may set handlers; one a caller installed is the caller's to keep.
        if threading.current_thread() is threading.main_thread():
            for signum in TERMINATING:
                if signal.getsignal(signum) == signal.SIG_DFL:
                    replaced[signum] = signal.signal(signum, terminate)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        yield folder
    except _Terminated:
        pass
    finally:
        closing = True
        shutil.rmtree(folder, ignore_errors=True)
        for signum, handler in replaced.items():
            signal.signal(signum, handler)
    if received:
        os.kill(os.getpid(), received[0])
        # Delivered to another thread, the signal may land a moment later: never carry on
        # as if the step had finished.
        raise SystemExit(128 + received[0])
