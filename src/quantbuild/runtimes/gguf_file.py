"""GGUF files: conversion from the pinned baseline, quantbuild's lineage key/values, and a
digest of the tensors that travels inside the file.

Conversion runs llama.cpp's own converter (`convert_hf_to_gguf`'s model classes and its
gguf-py, from the vendored tree). The converter identifies a BPE pre-tokenizer by hashing
the token IDs of a probe string; a tokenizer it has not seen is refused even when its
pre-tokenization is one llama.cpp implements. quantbuild does not patch llama.cpp: it
subclasses the converter's model class and, only when the hash is unknown, names the
llama.cpp pre-tokenizer whose rules the tokenizer's `tokenizer.json` states exactly
(`KNOWN_PRETOKENIZERS`); token-ID equality with the HF tokenizer is tested on every bundled
data file.

A `.gguf` is copied around without its bundle, so quantbuild writes its lineage into the
file's own metadata (`quantbuild.*` keys, JSON strings) and a sha256 over every tensor's
name, type, shape and bytes (`quantbuild.tensors_sha256`), which `quantbuild verify FILE.gguf`
recomputes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

from quantbuild.errors import ConfigError, IntegrityError

SCHEMA = "quantbuild.gguf/v1"
PREFIX = "quantbuild."
TENSORS_KEY = "quantbuild.tensors_sha256"
OUTTYPES = ("f32", "f16", "bf16")

# HF pre-tokenizer shapes (tokenizer.json `pre_tokenizer`, `normalizer`) that equal a
# llama.cpp pre-tokenizer: single digits split, then GPT-2's byte-level regex = starcoder.
KNOWN_PRETOKENIZERS = {
    "starcoder": {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    },
}


def _vendored() -> Path:
    from quantbuild.runtimes.llama_cpp import source_dir

    root = source_dir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def known_pretokenizer(tokenizer_json: Path) -> str | None:
    """The llama.cpp pre-tokenizer equal to this tokenizer's, or None."""
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    shape = {"normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer")}
    return next((name for name, known in KNOWN_PRETOKENIZERS.items() if known == shape), None)


def _architecture(baseline: Path) -> str:
    try:
        config = json.loads((baseline / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{baseline}/config.json: not readable JSON ({err})") from None
    architectures = config.get("architectures") or []
    if not architectures:
        raise ConfigError(f"{baseline}/config.json: names no architecture (allowed: an `architectures` list)")
    return architectures[0]


def supported_architectures() -> set[str]:
    _vendored()
    from conversion import TEXT_MODEL_MAP

    return set(TEXT_MODEL_MAP)


def check_architecture(baseline: Path) -> str:
    architecture = _architecture(baseline)
    if architecture not in supported_architectures():
        raise ConfigError(f"{baseline}/config.json: architecture {architecture!r} is not supported by llama.cpp's "
                          f"converter (allowed: a text architecture convert_hf_to_gguf knows, e.g. LlamaForCausalLM)")
    return architecture


def convert(baseline: Path, out: Path, outtype: str = "f16", model_name: str | None = None) -> None:
    """Convert the HF folder `baseline` to one GGUF file `out` of `outtype` (f32/f16/bf16)."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"gguf: base type {outtype!r} is not allowed (allowed: {' | '.join(OUTTYPES)})")
    architecture = check_architecture(baseline)
    _vendored()
    import gguf
    import torch
    from conversion import get_model_class

    # The converter warns at length about the unknown hash before our fallback names it, and
    # draws a progress bar: both go to a buffer, not the user's terminal.
    logging.getLogger("hf-to-gguf").setLevel(logging.ERROR)
    base_class = get_model_class(architecture)
    tokenizer_json = baseline / "tokenizer.json"

    class Converter(base_class):  # type: ignore[misc, valid-type]
        model_arch = base_class.model_arch

        def get_vocab_base_pre(self, tokenizer: Any) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                known = known_pretokenizer(tokenizer_json)
                if known is None:
                    raise ConfigError(f"{tokenizer_json}: llama.cpp does not know this BPE pre-tokenizer, and its "
                                      f"rules match none quantbuild can name (known: {', '.join(KNOWN_PRETOKENIZERS)})")
                return known

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]
    with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
        model = Converter(baseline, ftype, out, model_name=model_name)
        model.write()


def _reader(path: Path) -> Any:
    if not path.is_file():
        raise IntegrityError(f"{path}: GGUF file not found")
    try:
        import gguf
    except ImportError:
        _vendored()
        import gguf
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # gguf-py raises ValueError, struct.error, IndexError... on bad bytes
        raise IntegrityError(f"{path}: not a valid GGUF file ({type(err).__name__}: {err})") from None


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # a field gguf-py cannot decode is reported, not fatal
        return None


def metadata(path: Path) -> dict[str, Any]:
    """Every key/value of the file (quantbuild's JSON strings decoded)."""
    reader = _reader(path)
    values = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = _field_value(field)
        if name.startswith(PREFIX) and isinstance(value, str) and (value[:1] in ("{", "[") or value == "null"):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        values[name] = value
    return values


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> llama.cpp type name, in file order."""
    return {tensor.name: tensor.tensor_type.name for tensor in _reader(path).tensors}


def tensor_digest(path: Path) -> str:
    """sha256 over every tensor's name, type, shape and data bytes, in file order."""
    digest = hashlib.sha256()
    for tensor in _reader(path).tensors:
        header = f"{tensor.name}|{tensor.tensor_type.name}|{','.join(map(str, tensor.shape.tolist()))}|"
        digest.update(header.encode())
        digest.update(memoryview(tensor.data).cast("B"))
    return digest.hexdigest()


def write_with_lineage(source: Path, out: Path, lineage: dict[str, Any]) -> str:
    """Copy `source` to `out` with `quantbuild.<key>` = JSON of each lineage value added, plus
    the schema and the tensors' digest; returns that digest. Tensors are copied byte for byte."""
    import gguf

    reader = _reader(source)
    digest = tensor_digest(source)
    architecture = _field_value(reader.fields[gguf.Keys.General.ARCHITECTURE])
    writer = gguf.GGUFWriter(str(out), arch=architecture, endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(_field_value(alignment))
    for name, field in reader.fields.items():
        if name == gguf.Keys.General.ARCHITECTURE or name.startswith("GGUF.") or name.startswith(PREFIX):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, _field_value(field), kind, sub_type=sub_type)
    added = {"schema": SCHEMA, **{key: value if isinstance(value, str)
                                  else json.dumps(value, sort_keys=True, separators=(",", ":"))
                                  for key, value in sorted(lineage.items())}}
    for key, value in added.items():
        writer.add_string(f"{PREFIX}{key}", value)
    writer.add_string(TENSORS_KEY, digest)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return digest


def check_lineage(path: Path) -> list[str]:
    """Problems with a lone `.gguf`: no quantbuild lineage, or tensors that differ from the
    digest its metadata claims."""
    values = metadata(path)
    if values.get(f"{PREFIX}schema") != SCHEMA:
        return [f"{path.name}: no quantbuild lineage in its metadata (schema {values.get(PREFIX + 'schema')!r}, "
                f"expected {SCHEMA!r})"]
    claimed, actual = values.get(TENSORS_KEY), tensor_digest(path)
    if claimed != actual:
        return [f"{path.name}: tensor data differs from its metadata (claimed {claimed}, computed {actual})"]
    return []
