"""llama.cpp's measurements in a process of their own: the child, and the parent's handle.

A process that has loaded torch, transformers or sentencepiece (each wheel brings its own
OpenMP runtime) and then loads a CUDA build of llama.cpp crashed in model loading (SIGSEGV
on the H200; tests/test_llama_cuda.py keeps the order in the processes that read GGUF
files). The quantize stage must load all three to plan and validate an auto-mix, so the
validation's llama.cpp work runs here instead, in a child that imports llama.cpp before
anything else and answers one request at a time over a pipe, on the CPU as on a GPU (one
code path, the same numbers as in-process: a test compares them).

    with LlamaWorker(threads, repack, device) as worker:
        worker.reference("held", base, drawn)       # kept in the child under that name
        worker.divergence(path, "held", drawn)      # {text: {"kld_mean", "top1_agreement"}}

`drawn`: {text name: ([text or [token IDs, first scored position], ...], tokens)}, as
quantbuild.plan_validation draws it. A child's error comes back as the same one-line
QuantbuildError; a child that dies (a signal, a crash in C) is one line naming how.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from quantbuild.errors import QuantbuildError


class LlamaWorker:
    def __init__(self, threads: int, repack: bool, device: str) -> None:
        self.settings = {"threads": threads, "repack": repack, "device": device}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "LlamaWorker":
        from quantbuild.runtimes.llama_build import starting_child

        with starting_child():
            self.process = subprocess.Popen([sys.executable, "-m", "quantbuild.runtimes.llama_worker"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        """The child ends with its input; on an exception here (Ctrl-C, SIGTERM) it is killed."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.stdin.close()
            if kind is None:
                process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if process.poll() is None:
            process.kill()
        process.wait()

    def reference(self, name: str, base: Path, drawn: dict[str, Any]) -> None:
        self._ask({"op": "reference", "name": name, "path": str(base), "drawn": drawn})

    def divergence(self, path: Path, name: str, drawn: dict[str, Any]) -> dict[str, dict[str, float]]:
        return self._ask({"op": "divergence", "name": name, "path": str(path), "drawn": drawn})

    def _ask(self, request: dict[str, Any]) -> Any:
        process = self.process
        if process is None:
            raise RuntimeError("LlamaWorker used outside its `with` block")
        try:
            process.stdin.write(json.dumps({**request, **self.settings}) + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: its exit status says how, below
        line = process.stdout.readline()
        if not line:
            code = process.wait()
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise QuantbuildError(f"llama.cpp measurement of {request['path']}: its process ended ({how})")
        answer = json.loads(line)
        if "error" in answer:
            raise _error_class(answer["kind"])(answer["error"])
        return answer["result"]


def _error_class(name: str) -> type:
    from quantbuild import errors

    found = getattr(errors, name, None)
    return found if isinstance(found, type) and issubclass(found, QuantbuildError) else QuantbuildError


def _serve() -> None:
    # llama.cpp first (before numpy, gguf-py or anything that brings an OpenMP runtime)
    from quantbuild.runtimes.llama_bindings import bindings

    bindings()
    from quantbuild.plan_validation import kl_divergence, reference

    # the answers go to the real stdout; anything else printing there goes to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    stored: dict[str, Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        settings = (request["threads"], request["repack"], request["device"])
        drawn = {kind: (texts, counted) for kind, (texts, counted) in request["drawn"].items()}
        try:
            if request["op"] == "reference":
                stored[request["name"]] = reference(Path(request["path"]), drawn, *settings)
                result = None
            else:
                result = kl_divergence(Path(request["path"]), stored[request["name"]], drawn, *settings)
            answer = {"result": result}
        except QuantbuildError as error:
            answer = {"error": str(error), "kind": type(error).__name__}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    _serve()
