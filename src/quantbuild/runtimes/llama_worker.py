"""llama.cpp's measurements in a process of their own: the parent's handle and the child's loop.

A process that has loaded torch, transformers or sentencepiece (each wheel brings its own
native libraries, OpenMP among them) and then loads a CUDA build of llama.cpp crashed in
model loading on the H200 (bench/README.md, issue #26). A stage that must have those loaded
(the quantize stage plans and validates an auto-mix with them) hands its llama.cpp work to a
child instead: `python -m MODULE`, whose `__main__` calls `serve` before it imports anything
native, so llama.cpp's libraries load first there, on the CPU as on a GPU (one code path:
a test compares its numbers with the same measurement in-process).

    with LlamaWorker("quantbuild.plan_validation", {"device": "cuda", ...}) as worker:
        worker.ask("reference", name="held", path=str(base), ...)

The child answers one request at a time over a pipe (JSON lines); `settings` go with every
request. A QuantbuildError there comes back here as the same one line (the same class); a
child that dies (a signal, a crash in C) is one line naming how.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

from quantbuild.errors import QuantbuildError


class LlamaWorker:
    def __init__(self, module: str, settings: dict[str, Any]) -> None:
        self.module, self.settings = module, settings
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "LlamaWorker":
        from quantbuild.runtimes.llama_build import starting_child

        with starting_child():
            self.process = subprocess.Popen([sys.executable, "-m", self.module], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True)
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

    def ask(self, op: str, **request: Any) -> Any:
        process = self.process
        if process is None:
            raise RuntimeError("LlamaWorker used outside its `with` block")
        try:
            process.stdin.write(json.dumps({"op": op, **request, "settings": self.settings}) + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: its exit status says how, below
        line = process.stdout.readline()
        if not line:
            code = process.wait()
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise QuantbuildError(f"llama.cpp's {op} in {self.module}: its process ended ({how})")
        answer = json.loads(line)
        if "error" in answer:
            raise _error_class(answer["kind"])(answer["error"])
        return answer["result"]


def _error_class(name: str) -> type:
    from quantbuild import errors

    found = getattr(errors, name, None)
    return found if isinstance(found, type) and issubclass(found, QuantbuildError) else QuantbuildError


def serve(handlers: dict[str, Callable[[dict[str, Any]], Any]]) -> None:
    """The child's loop: llama.cpp's libraries loaded first, then each request on stdin
    answered by `handlers[op](request)` on the real stdout (anything else printing there
    goes to stderr)."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # before llama.cpp loads: nothing it prints can land among the answers
    from quantbuild.runtimes.llama_bindings import bindings

    bindings()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"result": handlers[request["op"]](request)}
        except QuantbuildError as error:
            answer = {"error": str(error), "kind": type(error).__name__}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
