"""The torch runtime: a checkpoint in transformers, as a transformers, GPTQModel or
bitsandbytes user deploys it, behind the `Runtime` protocol.

Loading follows the checkpoint's format: GPTQ/AWQ checkpoints (`quantize_config.json`)
through GPTQModel's loader and kernels (runtimes.gptqmodel_loader), bitsandbytes
checkpoints (`quantization_config.quant_method: bitsandbytes` in config.json) through
transformers with bitsandbytes' kernels, anything else as a dense transformers checkpoint.
Generation is transformers' own batched `generate` (greedy), so what is scored is what a
user gets; timing is a plain KV-cached greedy loop so prefill and decode are timed apart.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from quantbuild.runtimes.gptqmodel_loader import is_gptqmodel_checkpoint, kernel_names, load_quantized
from quantbuild.runtimes.protocol import TORCH, ChatFormat, Completion, LoadSpec, Timing
from quantbuild.runtimes.torch_memory import measure_memory


def load_checkpoint(folder: Path, runtime: str = "kernel", device: str = "cpu",
                    kernels: dict[str, str] | None = None) -> Any:
    """Any checkpoint quantbuild builds, through the loader a user deploys it with, on
    `device`, in eval mode. They compute in float32, except on a CUDA GPU's `kernel`
    runtime: float16, as they deploy there (so a baseline and its dequantized variants are
    compared at one precision, and so are their kernels). `runtime` does not change
    bitsandbytes or dense checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM

    if is_gptqmodel_checkpoint(folder):
        return load_quantized(folder, runtime, device, kernels)
    dtype = torch.float16 if device == "cuda" and runtime == "kernel" else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(folder), device_map=device, dtype=dtype).eval()


class TorchRuntime:
    """A transformers model (dense, GPTQModel or bitsandbytes) and its tokenizer."""

    name = TORCH

    def __init__(self, model: Any, tokenizer: Any, load_runtime: str = "kernel", kernels: dict | None = None,
                 batch_size: int = 32, artifact: Optional[Path] = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.load_runtime, self.kernels, self.batch_size = load_runtime, dict(kernels or {}), batch_size
        self.artifact = artifact
        self.n_vocab = len(tokenizer)

    def __enter__(self) -> "TorchRuntime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.model = None

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.load_runtime, "deploy_runtime": TORCH,
                "torch": {"device": str(self.device),
                          "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                          "kernels": kernel_names(self.model)}}

    def probe_settings(self) -> dict[str, Any]:
        return {"load_runtime": self.load_runtime, "device": str(self.device),
                "gpu_kernels": dict(sorted(self.kernels.items()))}

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, split_special_tokens=not special)["input_ids"]

    def bos_token(self) -> Optional[int]:
        return self.tokenizer.bos_token_id

    def logprobs(self, tokens: list[int]) -> Any:
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([tokens], device=self.device)).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1).cpu().numpy()

    def text_positions(self, texts: list[str]) -> Iterator[tuple[Any, Any]]:
        """Batches of `batch_size` texts, right-padded: valid positions only, as numpy arrays
        (the protocol's), whatever device the model runs on."""
        import torch

        self.tokenizer.padding_side = "right"
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt",
                                   padding=True).to(self.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits.float()
            mask = batch["attention_mask"][:, 1:].bool()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)[mask]
            yield logprobs.cpu().numpy(), batch["input_ids"][:, 1:][mask].cpu().numpy()

    def complete(self, prompts: list[str], max_new_tokens: int, special: bool = False) -> list[Completion]:
        """transformers' greedy `generate`, left-padded batches of similar length (greedy
        decoding makes the result independent of that order)."""
        import torch

        order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
        outputs: dict[int, Completion] = {}
        self.tokenizer.padding_side = "left"
        eos = self.tokenizer.eos_token_id
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = self.tokenizer([prompts[index] for index in chunk], return_tensors="pt", padding=True,
                                   split_special_tokens=not special).to(self.device)
            with torch.inference_mode():
                generated = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                                pad_token_id=self.tokenizer.pad_token_id,
                                                eos_token_id=self.tokenizer.eos_token_id)
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for index, text, tokens in zip(chunk, texts, new_tokens.tolist()):
                outputs[index] = Completion(text, eos in tokens)
        return [outputs[index] for index in range(len(prompts))]

    def generate(self, tokens: list[int], max_new_tokens: int) -> list[int]:
        import torch

        generated: list[int] = []
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([tokens], device=self.device), use_cache=True)
            for _ in range(max_new_tokens):
                token = int(out.logits[0, -1].argmax())
                if token == self.tokenizer.eos_token_id:
                    break
                generated.append(token)
                out = self.model(input_ids=torch.tensor([[token]], device=self.device),
                                 past_key_values=out.past_key_values, use_cache=True)
        return generated

    def reserve(self, tokens: int) -> None:
        """Nothing to allocate ahead: transformers grows its KV cache as it goes."""

    def timed(self, tokens: list[int], new_tokens: int) -> Timing:
        import torch

        input_ids = torch.tensor([tokens], device=self.device)
        # CUDA kernels run asynchronously: the clock is read only once the device has finished.
        sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
        with torch.inference_mode():
            sync()
            started = time.perf_counter()
            out = self.model(input_ids=input_ids, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            first = time.perf_counter() - started
            past = out.past_key_values
            decode_started = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            per_token = (time.perf_counter() - decode_started) / max(1, new_tokens - 1)
        return Timing(first, per_token)

    def memory(self, context_lengths: list[int], budget_mb: float) -> dict[str, Any]:
        return measure_memory(self.model, context_lengths, budget_mb, self.artifact, seed=0)

    @contextmanager
    def at_threads(self, threads: int, tokens: int = 256) -> Iterator["TorchRuntime"]:
        """This model at `threads` intra-op threads while open."""
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield self
        finally:
            torch.set_num_threads(before)


def chat_format(folder: Path) -> ChatFormat:
    """The chat template of a checkpoint's tokenizer (`chat_template.jinja`, else
    `chat_template` in `tokenizer_config.json`; None for a base model)."""
    import json

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")

    def token(key: str) -> str:
        value = config.get(key)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    return ChatFormat(template if isinstance(template, str) else None, token("bos_token"), token("eos_token"))


def open(spec: LoadSpec) -> TorchRuntime:
    """The checkpoint folder `spec.artifact` with its tokenizer, on `spec.device`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(spec.artifact))
    model = load_checkpoint(spec.artifact, spec.load_runtime, spec.device, spec.kernels)
    return TorchRuntime(model, tokenizer, spec.load_runtime, spec.kernels, spec.batch_size, spec.artifact)
