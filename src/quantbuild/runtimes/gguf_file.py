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
file's own metadata (`quantbuild.*` keys, JSON strings), a sha256 over every tensor's name,
type, shape and bytes (`quantbuild.tensors_sha256`), and a sha256 of every other key/value
as stored (`quantbuild.kv_sha256`: the tokenizer, the chat template and the lineage alike),
which `quantbuild verify FILE.gguf` and `quantbuild lineage FILE.gguf` recompute: an edited,
added or removed key/value names itself. Inside the file these digests catch an edit that
did not also rewrite them; with a signing key configured, the bundle's copy also carries a
signature over both digests (`quantbuild.signature`, deterministic ECDSA, and the signer's
public-key sha256), which `verify FILE.gguf --public-key` checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from quantbuild.errors import ConfigError, IntegrityError, RuntimeUnavailable
from quantbuild.runtimes.llama_build import vendored_converter

SCHEMA = "quantbuild.gguf/v2"
PREFIX = "quantbuild."
TENSORS_KEY = "quantbuild.tensors_sha256"
KV_KEY = "quantbuild.kv_sha256"
# written after the digests, over them: not themselves in `quantbuild.kv_sha256`
SIGNATURE_KEY = "quantbuild.signature"
SIGNER_KEY = "quantbuild.signer_public_key_sha256"
SIGNED_KEYS = (SIGNATURE_KEY, SIGNER_KEY)
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
    vendored_converter()
    from conversion import TEXT_MODEL_MAP

    return set(TEXT_MODEL_MAP)


def check_architecture(baseline: Path) -> str:
    architecture = _architecture(baseline)
    if architecture not in supported_architectures():
        raise ConfigError(f"{baseline}/config.json: architecture {architecture!r} is not supported by llama.cpp's "
                          f"converter (allowed: a text architecture convert_hf_to_gguf knows, e.g. LlamaForCausalLM)")
    return architecture


def gguf_py() -> Any:
    """The vendored gguf-py, imported after llama.cpp's own libraries where they are
    installed, for the processes that read a GGUF file and then run it. gguf-py imports
    sentencepiece, whose wheel carries its own GNU OpenMP runtime; loaded before it,
    llama.cpp's CUDA build crashed inside model loading on an H200 (SIGSEGV in every
    evaluate stage), and loaded first, the same stage ran (bench/README.md). The converter
    and the sensitivity stage import gguf-py plainly: they run torch, never llama.cpp, in
    their own process."""
    if "gguf" not in sys.modules:
        from quantbuild.runtimes.llama_bindings import bindings

        with contextlib.suppress(RuntimeUnavailable):
            bindings()
    import gguf

    return gguf


def convert(baseline: Path, out: Path, outtype: str = "f16", model_name: str | None = None) -> None:
    """Convert the HF folder `baseline` to one GGUF file `out` of `outtype` (f32/f16/bf16)."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"gguf: base type {outtype!r} is not allowed (allowed: {' | '.join(OUTTYPES)})")
    architecture = check_architecture(baseline)
    vendored_converter()
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


# GGUF value types (gguf-py's GGUFValueType), and the struct format of the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    type_name: str
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def elements(self) -> int:
        return math.prod(self.dims)


@dataclass(frozen=True)
class Layout:
    """A GGUF file's header as byte ranges: key/values (scalars and strings decoded, arrays
    summarised), tensor infos, where each tensor's bytes lie. Read without materialising
    the vocabulary (gguf-py's reader builds every token: seconds for a large vocab)."""

    version: int
    values: dict[str, Any]
    # each key/value's bytes (key, type and value as written)
    kv_entries: dict[str, bytes]
    kv_bytes: bytes
    tensor_info_bytes: bytes
    tensors: list[TensorInfo]
    alignment: int
    data_start: int


class _Cursor:
    def __init__(self, data: Any, path: Path) -> None:
        self.data, self.at, self.path = data, 0, path

    def take(self, size: int) -> Any:
        if self.at + size > len(self.data):
            raise IntegrityError(f"{self.path}: not a valid GGUF file (truncated header at byte {self.at})")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def skip(self, size: int) -> None:
        if self.at + size > len(self.data):
            raise IntegrityError(f"{self.path}: not a valid GGUF file (truncated header at byte {self.at})")
        self.at += size

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        size = self.unpack("<Q")
        try:
            return bytes(self.take(size)).decode("utf-8")
        except UnicodeDecodeError:
            raise IntegrityError(f"{self.path}: not a valid GGUF file (a key or string is not UTF-8)") from None

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if count > 64:  # a vocabulary, merges, scores: stepped over, not decoded
                if item in _SCALARS:
                    self.skip(struct.calcsize(_SCALARS[item]) * count)
                elif item == _STRING:
                    for _ in range(count):
                        self.skip(self.unpack("<Q"))
                else:
                    for _ in range(count):
                        self.value(item)
                return {"array_of": item, "count": count}
            if item in _SCALARS:
                raw = self.take(struct.calcsize(_SCALARS[item]) * count)
                return list(struct.unpack(f"<{count}{_SCALARS[item][1]}", raw))
            return [self.value(item) for _ in range(count)]
        raise IntegrityError(f"{self.path}: not a valid GGUF file (unknown value type {kind} at byte {self.at})")


def layout(path: Path) -> Layout:
    """Parse the header of `path`; anything malformed is an IntegrityError naming the file."""
    import mmap

    gguf = gguf_py()
    if not path.is_file():
        raise IntegrityError(f"{path}: GGUF file not found")
    with path.open("rb") as handle:
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise IntegrityError(f"{path}: not a valid GGUF file (empty)") from None
    with data:
        cursor = _Cursor(data, path)
        if bytes(cursor.take(4)) != MAGIC:
            raise IntegrityError(f"{path}: not a valid GGUF file (bad magic; big-endian GGUF is not supported)")
        version, tensor_count, kv_count = cursor.unpack("<I"), cursor.unpack("<Q"), cursor.unpack("<Q")
        if version not in (2, 3) or tensor_count > 10**7 or kv_count > 10**7:
            raise IntegrityError(f"{path}: not a valid GGUF file (version {version}, {tensor_count} tensors, "
                                 f"{kv_count} keys)")
        kv_start, values, entries = cursor.at, {}, {}
        for _ in range(kv_count):
            start = cursor.at
            key = cursor.string()
            if key in values:
                raise IntegrityError(f"{path}: not a valid GGUF file (key {key!r} appears twice)")
            values[key] = cursor.value(cursor.unpack("<I"))
            entries[key] = bytes(data[start:cursor.at])
        kv_end = cursor.at
        alignment = int(values.get("general.alignment", 32))
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = tuple(cursor.unpack("<Q") for _ in range(cursor.unpack("<I")))
            kind, offset = cursor.unpack("<I"), cursor.unpack("<Q")
            infos.append((name, dims, kind, offset))
        info_end = cursor.at
        data_start = -(-info_end // alignment) * alignment
        tensors = []
        for name, dims, kind, offset in infos:
            try:
                quant = gguf.GGMLQuantizationType(kind)
                block, size = gguf.GGML_QUANT_SIZES[quant]
            except (ValueError, KeyError):
                raise IntegrityError(f"{path}: not a valid GGUF file (tensor {name} has unknown type {kind})") from None
            nbytes = math.prod(dims) // block * size
            if data_start + offset + nbytes > len(data):
                raise IntegrityError(f"{path}: not a valid GGUF file (tensor {name} runs past the end of the file)")
            tensors.append(TensorInfo(name, dims, quant.name, data_start + offset, nbytes))
        return Layout(version, values, entries, bytes(data[kv_start:kv_end]), bytes(data[kv_end:info_end]), tensors,
                      alignment, data_start)


def vocabulary_token(file: Layout, path: Path, index: Optional[int]) -> str:
    """The text of token `index` of the file's vocabulary (`tokenizer.ggml.tokens`), read
    from that key's bytes without decoding the others; "" for no such token."""
    entry = file.kv_entries.get("tokenizer.ggml.tokens")
    if entry is None or not isinstance(index, int) or index < 0:
        return ""
    cursor = _Cursor(entry, path)
    cursor.string()
    if cursor.unpack("<I") != _ARRAY or cursor.unpack("<I") != _STRING:
        return ""
    if index >= cursor.unpack("<Q"):
        return ""
    for _ in range(index):
        cursor.skip(cursor.unpack("<Q"))
    return cursor.string()


def metadata(path: Path) -> dict[str, Any]:
    """Every key/value of the file (large arrays summarised; quantbuild's JSON decoded)."""
    values = {}
    for name, value in layout(path).values.items():
        if name.startswith(PREFIX) and isinstance(value, str) and (value[:1] in ("{", "[") or value == "null"):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        values[name] = value
    return values


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> llama.cpp type name, in file order."""
    return {tensor.name: tensor.type_name for tensor in layout(path).tensors}


def _in_data_order(tensors: list[TensorInfo]) -> list[TensorInfo]:
    return sorted(tensors, key=lambda tensor: tensor.offset)


def _tensor_header(tensor: TensorInfo) -> bytes:
    return f"{tensor.name}|{tensor.type_name}|{','.join(map(str, tensor.dims))}|".encode()


def _hash_tensors(path: Path, tensors: list[TensorInfo], digest: Any) -> str:
    """`digest` updated with each of `tensors`' name, type, dims and data bytes, in order."""
    with path.open("rb") as handle:
        for tensor in tensors:
            digest.update(_tensor_header(tensor))
            handle.seek(tensor.offset)
            remaining = tensor.nbytes
            while remaining:
                block = handle.read(min(remaining, 1 << 22))
                digest.update(block)
                remaining -= len(block)
    return digest.hexdigest()


def tensor_digest(path: Path) -> str:
    """sha256 over every tensor's name, type, dims and data bytes, in the order of the data."""
    return _hash_tensors(path, _in_data_order(layout(path).tensors), hashlib.sha256())


def model_digest(path: Path) -> str:
    """sha256 of what llama.cpp computes with: every key/value but quantbuild's lineage, in
    key order, and every tensor's name, type, dims and bytes, in name order. Two files with
    equal digests give the same outputs whatever lineage they carry and however their
    tensors are laid out (llama-quantize writes an F16 file's tensors in another order)."""
    source = layout(path)
    digest = hashlib.sha256()
    for key in sorted(source.kv_entries):
        if not key.startswith(PREFIX):
            digest.update(source.kv_entries[key])
    return _hash_tensors(path, sorted(source.tensors, key=lambda tensor: tensor.name), digest)


def _kv_string(key: str, value: str) -> bytes:
    encoded_key, encoded = key.encode(), value.encode()
    return (struct.pack("<Q", len(encoded_key)) + encoded_key + struct.pack("<I", _STRING)
            + struct.pack("<Q", len(encoded)) + encoded)


def write_with_lineage(source: Path, out: Path, lineage: dict[str, Any]) -> str:
    """Copy `source` to `out` with `quantbuild.<key>` (strings as they are, anything else as
    JSON) added for each lineage value, plus the schema and the tensors' digest; returns that
    digest. Key/values, tensor infos and tensor bytes are copied byte for byte (tensor
    offsets are relative to the data section, so they hold), in one pass: the digest is
    hashed while the tensors are copied and written into its fixed-width slot afterwards."""
    source_layout = layout(source)
    if any(key.startswith(PREFIX) for key in source_layout.values):
        raise IntegrityError(f"{source}: already carries quantbuild lineage")
    added = {"schema": SCHEMA, **{key: value if isinstance(value, str)
                                  else json.dumps(value, sort_keys=True, separators=(",", ":"))
                                  for key, value in sorted(lineage.items())}}
    written = {f"{PREFIX}{key}": _kv_string(f"{PREFIX}{key}", value) for key, value in added.items()}
    digests = {key: hashlib.sha256(entry).hexdigest() for key, entry in {**source_layout.kv_entries, **written}.items()}
    entries = b"".join(written.values()) + _kv_string(KV_KEY, json.dumps(digests, sort_keys=True, separators=(",", ":")))
    placeholder = "0" * 64
    header = (MAGIC + struct.pack("<I", source_layout.version) + struct.pack("<Q", len(source_layout.tensors))
              + struct.pack("<Q", len(source_layout.values) + len(added) + 2) + source_layout.kv_bytes + entries
              + _kv_string(TENSORS_KEY, placeholder))
    digest_at = len(header) - len(placeholder)
    header += source_layout.tensor_info_bytes
    digest = hashlib.sha256()
    with source.open("rb") as reader, out.open("wb") as writer:
        writer.write(header + b"\0" * (-len(header) % source_layout.alignment))
        reader.seek(source_layout.data_start)
        position = source_layout.data_start
        for tensor in _in_data_order(source_layout.tensors):
            writer.write(reader.read(tensor.offset - position))  # alignment padding between tensors
            digest.update(_tensor_header(tensor))
            remaining = tensor.nbytes
            while remaining:
                block = reader.read(min(remaining, 1 << 22))
                digest.update(block)
                writer.write(block)
                remaining -= len(block)
            position = tensor.offset + tensor.nbytes
        writer.write(reader.read())
        writer.seek(digest_at)
        writer.write(digest.hexdigest().encode())
    return digest.hexdigest()


def with_rows(source: Path, rows: dict[str, Any], out: Path) -> None:
    """A copy of `source` whose 2-D tensors named in `rows` hold only those rows (ascending
    indices, each row's bytes as stored), every key/value and other tensor byte for byte: a
    thumbnail that llama-quantize quantizes to exactly those rows of the whole file's (a
    quantized block never spans rows; bench/row_sample.py checks it bit for bit), at a
    fraction of the work. Written a chunk of rows at a time."""
    import numpy as np

    gguf = gguf_py()
    source_layout = layout(source)
    data = np.memmap(source, dtype=np.uint8, mode="r")
    alignment = source_layout.alignment
    infos, placed, offset = [], [], 0
    for tensor in source_layout.tensors:
        dims, picked = tensor.dims, rows.get(tensor.name)
        nbytes = tensor.nbytes
        if picked is not None:
            picked = np.asarray(picked, dtype=np.int64)
            if len(dims) != 2 or not len(picked) or np.any(np.diff(picked) <= 0) or picked[0] < 0 \
                    or picked[-1] >= dims[1]:
                raise IntegrityError(f"{source}: no rows {tensor.name} can be cut to (dims {dims})")
            nbytes = nbytes // dims[1] * len(picked)
            dims = (dims[0], len(picked))
        offset = -(-offset // alignment) * alignment
        name = tensor.name.encode()
        infos.append(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", dim) for dim in dims)
                     + struct.pack("<I", gguf.GGMLQuantizationType[tensor.type_name].value) + struct.pack("<Q", offset))
        placed.append((tensor, picked, offset))
        offset += nbytes
    header = (MAGIC + struct.pack("<I", source_layout.version) + struct.pack("<Q", len(source_layout.tensors))
              + struct.pack("<Q", len(source_layout.values)) + source_layout.kv_bytes + b"".join(infos))
    header += b"\0" * (-len(header) % alignment)
    with out.open("wb") as writer:
        writer.write(header)
        for tensor, picked, start in placed:
            writer.write(b"\0" * (len(header) + start - writer.tell()))
            stored = data[tensor.offset: tensor.offset + tensor.nbytes]
            if picked is None:
                for at in range(0, tensor.nbytes, 1 << 24):
                    writer.write(stored[at: at + (1 << 24)].tobytes())
                continue
            by_row = stored.reshape(tensor.dims[1], -1)
            for at in range(0, len(picked), 1024):
                writer.write(by_row[picked[at: at + 1024]].tobytes())


def metadata_changes(path: Path) -> list[str]:
    """Each key/value that differs from `quantbuild.kv_sha256` (changed, added or removed),
    by name; one entry when the digest itself is missing or malformed."""
    source = layout(path)
    try:
        recorded = json.loads(source.values.get(KV_KEY, ""))
    except (TypeError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        return [f"no digest of its key/values ({KV_KEY})"]
    actual = {key: hashlib.sha256(entry).hexdigest() for key, entry in source.kv_entries.items()
              if key not in (KV_KEY, TENSORS_KEY, *SIGNED_KEYS)}
    return ([f"{key} changed" for key in sorted(actual) if key in recorded and recorded[key] != actual[key]]
            + [f"{key} added" for key in sorted(set(actual) - set(recorded))]
            + [f"{key} removed" for key in sorted(set(recorded) - set(actual))])


def trained_context(path: Path) -> Optional[int]:
    """The context length the model was trained for (`<architecture>.context_length`)."""
    values = layout(path).values
    length = values.get(f"{values.get('general.architecture')}.context_length")
    return int(length) if isinstance(length, int) else None


def signed_payload(path: Path) -> bytes:
    """What a GGUF's signature signs: its key/value digest and its tensors' digest, as stored
    (`check_lineage` checks that both match the file)."""
    values = layout(path).values
    return f"{values.get(KV_KEY)}\n{values.get(TENSORS_KEY)}".encode()


def with_strings(source: Path, out: Path, added: dict[str, str]) -> None:
    """Copy `source` to `out` with string key/values `added` appended (keys it lacks), the
    rest byte for byte (tensor offsets are relative to the data section, so they hold)."""
    source_layout = layout(source)
    clash = sorted(set(added) & set(source_layout.values))
    if clash:
        raise IntegrityError(f"{source}: already has {clash[0]}")
    header = (MAGIC + struct.pack("<I", source_layout.version) + struct.pack("<Q", len(source_layout.tensors))
              + struct.pack("<Q", len(source_layout.values) + len(added)) + source_layout.kv_bytes
              + b"".join(_kv_string(key, value) for key, value in added.items()) + source_layout.tensor_info_bytes)
    with source.open("rb") as reader, out.open("wb") as writer:
        writer.write(header + b"\0" * (-len(header) % source_layout.alignment))
        reader.seek(source_layout.data_start)
        shutil.copyfileobj(reader, writer, 1 << 22)


def check_lineage(path: Path) -> list[str]:
    """Problems with a lone `.gguf`, one line each: no quantbuild lineage (or an older one
    without a digest of its key/values), key/values or tensors that differ from the digests
    its metadata claims."""
    values = metadata(path)
    if values.get(f"{PREFIX}schema") != SCHEMA:
        return [f"{path.name}: no quantbuild lineage in its metadata (schema {values.get(PREFIX + 'schema')!r}, "
                f"expected {SCHEMA!r}: an older quantbuild's file is rebuilt with `dvc repro`)"]
    problems = []
    changes = metadata_changes(path)
    if changes:
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        problems.append(f"{path.name}: metadata differs from its digest: {changes[0]}{more}")
    claimed, actual = values.get(TENSORS_KEY), tensor_digest(path)
    if claimed != actual:
        problems.append(f"{path.name}: tensor data differs from its metadata (claimed {claimed}, computed {actual})")
    return problems
