"""Write the release bundle `<package dir>/<model>-<variant>/`: the model files, a model
card, an Ollama `Modelfile` for GGUF variants, `provenance.intoto.json`, `manifest.json`
with the lineage, and, where a signing key is configured, `model.sig` over all of them;
nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from quantbuild.gguf_artifacts import MODEL_FILE
from quantbuild.hashing import require_space, sha256_file, staged_dir, write_json
from quantbuild.release.manifest import MANIFEST, SCHEMA
from quantbuild.release.provenance import PROVENANCE, statement
from quantbuild.runtimes.gguf_file import trained_context
from quantbuild.runtimes.protocol import LLAMA_CPP, ChatFormat, LoadSpec, chat_format
from quantbuild.tasks import tool_calls

CARD = "README.md"
MODELFILE = "Modelfile"
LINEAGE_STAGES = ("fetch", "calibrate", "gguf_base", "imatrix", "sensitivity", "quantize@{v}", "evaluate@{v}-{t}",
                  "evaluate_baseline@{t}", "repair", "select")
# per deploy target: its probes under targets/<target>/ in the bundle
TARGETS = "targets"


def git_state(repo: Path) -> dict[str, Any]:
    from quantbuild.release.registry import git

    commit = git(repo, "rev-parse", "HEAD", check=False)
    return {"commit": commit or None, "dirty": bool(git(repo, "status", "--porcelain", "--untracked-files=no", check=False))}


def dvc_lock_entries(lock_path: Path, variant: str, targets: list[str]) -> dict[str, Any]:
    """The dvc.lock entries of the stages that produced the bundle on its `targets` (empty
    if no lock yet)."""
    import yaml

    if not lock_path.is_file():
        return {}
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    wanted = dict.fromkeys(name.format(v=variant, t=target) for name in LINEAGE_STAGES for target in targets)
    return {name: stages[name] for name in wanted if name in stages}


def _describe(variant: dict[str, Any]) -> str:
    parameters = variant["parameters"]
    if variant["method"] == "gguf":
        imatrix = " with an importance matrix" if parameters.get("imatrix") else ""
        if parameters.get("target_bpw"):
            kind = (f"auto-mix (per-tensor {'/'.join(parameters['mix_types'])} within {parameters['target_bpw']} "
                    f"bits per weight over the decoder; other tensors as {parameters['type']})")
        else:
            kind = parameters["type"]
        return f"llama.cpp {kind} GGUF{imatrix} (KV cache {parameters['kv_cache_type']})"
    return f"{variant['method'].upper()} {parameters['bits']}-bit (group size {parameters['group_size']})"


def model_card(manifest: dict[str, Any], example: Optional[tuple[str, str]] = None) -> str:
    variant, baseline = manifest["variant"], manifest["evaluation"]["baseline"]
    measured = manifest["evaluation"]["variant"]
    rows = []
    for family in sorted(measured.get("families", {})):
        rows.append(f"| {family} | {baseline['families'][family]['score']:.3f} | {measured['families'][family]['score']:.3f} |")
    if "perplexity" in measured:
        rows.insert(0, f"| perplexity | {baseline['perplexity']:.4f} | {measured['perplexity']:.4f} |")
    runtime = manifest.get("deploy_runtime", "torch")
    memory = measured.get("memory", {})
    return "\n".join([
        f"# {manifest['bundle']}",
        "",
        f"{_describe(variant)} quantization of `{manifest['model']['name']}`, {variant['bits_per_weight']} effective "
        f"bits per weight, built by quantbuild and released by its gate after evaluation on {runtime}.",
        "",
        "## Scores (baseline vs this artifact, both measured on " + runtime + ")",
        "",
        "| metric | baseline | this |",
        "|---|---|---|",
        *rows,
        "",
        f"KL divergence vs baseline (as llama-perplexity --kl-divergence measures it): mean "
        f"{measured.get('kld_mean', 0):.5f}, p99 {measured.get('kld_p99', 0):.5f}; "
        f"top-1 agreement {measured.get('top1_agreement', 1):.4f}. Model memory by context (MiB): "
        + ", ".join(f"{ctx}: {values['peak_mb']}" for ctx, values in sorted(memory.get("by_context", {}).items(),
                                                                           key=lambda kv: int(kv[0]))) + ".",
        "",
        "## Lineage",
        "",
        f"- baseline: {manifest['model']['source']} `{manifest['model']['location']}`"
        f" revision {manifest['model']['revision'] or 'n/a'}",
        f"- calibration digest: `{manifest['calibration']['digest']}`",
        *([f"- importance matrix: `{manifest['imatrix']['sha256']}` over {manifest['imatrix']['tokens_used']} "
           f"calibration tokens"] if manifest.get("imatrix") else []),
        f"- libraries: {', '.join(f'{k} {v}' for k, v in sorted(variant['libraries'].items()))}",
        f"- git commit: {manifest['git']['commit']}",
        "",
        "## Validated in",
        "",
        f"{runtime}: scores, latency, memory and the behavioural probes above were measured there"
        + (f" (llama-cpp-python {variant['libraries'].get('llama-cpp-python', '?')})" if runtime == "llama.cpp" else "")
        + ". `quantbuild verify BUNDLE --behaviour` reruns the probes on your machine.",
        "",
        "## Run it",
        "",
        *(_gguf_instructions(manifest["bundle"], example) if variant["method"] == "gguf"
          else RUN_INSTRUCTIONS.get(variant["method"], RUN_INSTRUCTIONS["gptq"])(manifest["bundle"])),
        "",
        *(_chat_instructions(manifest["bundle"], measured["prompts"])
          if measured.get("prompts", {}).get("prompt_format") == "chat" else []),
        "## Verify",
        "",
        f"`quantbuild verify artifacts/package/{manifest['bundle']}` re-hashes every file against `manifest.json`, "
        "checks the",
        "signature (`--public-key`) where the bundle is signed, and compares this machine's runtime with the",
        "one the artifact was validated on (exit 0 ok, 1 integrity, 2 drift). `provenance.intoto.json` is",
        "an in-toto statement with SLSA provenance; `quantbuild lineage` prints the whole chain.",
        "",
    ])


def _gguf_instructions(bundle: str, example: Optional[tuple[str, str]] = None) -> list[str]:
    return [
        f"`model.gguf` in this folder (`artifacts/package/{bundle}/` in the project that built it; below,",
        "`BUNDLE` is this folder's path, absolute or relative to where you run the command). The file's own",
        "metadata carries quantbuild's lineage (`quantbuild verify BUNDLE/model.gguf` checks it alone).",
        "",
        "Runs in every llama.cpp-based runtime; only llama.cpp itself (below) was validated:",
        "",
        "- llama.cpp, decoding as evaluated (greedy, no repetition penalty; `--no-repack` on CPUs with AMX or",
        "  AVX-512, see below): `llama-server -m BUNDLE/model.gguf --temp 0 --repeat-penalty 1 --no-repack`, or",
        "  `llama-cli` with the same flags and `-p \"...\" -n 64`. The project that built this bundle has",
        "  llama-server at `.venv/llama.cpp/build/bin/` (`make install` builds it, not llama-cli).",
        f"- Ollama: `cd BUNDLE && ollama create {bundle} -f Modelfile && ollama run {bundle}`",
        "- LM Studio: `lms import BUNDLE/model.gguf`, then load it from My Models",
        "- Python (`pip install llama-cpp-python==0.3.36`), from any folder, no network:",
        "",
        "```python",
        "from pathlib import Path",
        "",
        "import llama_cpp.llama_cpp as C",
        "from llama_cpp import Llama",
        "",
        "defaults = C.llama_model_default_params",
        "",
        "def no_repack():  # as validated: llama.cpp's weight repack crashed on AMX/AVX-512 CPUs",
        "    params = defaults()",
        "    params.use_extra_bufts = False",
        "    return params",
        "",
        "C.llama_model_default_params = no_repack",
        f"bundle = Path('artifacts/package/{bundle}').resolve()  # or wherever this folder is",
        "llm = Llama(model_path=str(bundle / 'model.gguf'), n_ctx=1024, verbose=False)",
        *([f"print(llm({example[0]!r}, max_tokens=16, temperature=0, repeat_penalty=1.0)['choices'][0]['text'])",
           f"# prints {example[1]!r}: this model's greedy answer to a synthetic probe, checked when the card was written"]
          if example else
          ["print(llm('Question: What is 46 + 16?\\nAnswer:', max_tokens=16, temperature=0, repeat_penalty=1.0)"
           "['choices'][0]['text'])",
           "# (no probe was answered right when the card was written: the answer is not claimed)"]),
        "```",
        "",
        "On CPUs with AMX or AVX-512, load without weight repacking (`--no-repack`; in the C API",
        "`use_extra_bufts = false`): llama.cpp's repack path crashed on them where this was validated.",
    ]


# One request of each kind for an instruct model's card, as the bundled eval items pose them.
_CHAT_EXAMPLE = [{"role": "user", "content": "What is 30 + 42?"}]
_TOOL_EXAMPLE = {"type": "function", "function": {
    "name": "convert_currency", "description": "Convert an amount between currencies.",
    "parameters": {"type": "object", "properties": {"amount": {"type": "integer"},
                                                    "source": {"type": "string"}, "target": {"type": "string"}},
                   "required": ["amount", "source", "target"]}}}


def _chat_instructions(bundle: str, prompts: dict[str, Any]) -> list[str]:
    """How to talk to an instruct model's bundle: a chat and a tool call, for llama-server,
    Ollama and llama-cpp-python."""
    import json

    chat = json.dumps({"messages": _CHAT_EXAMPLE, "temperature": 0})
    tool = json.dumps({"messages": [{"role": "user", "content": "Convert 120 EUR to USD."}], "tools": [_TOOL_EXAMPLE],
                       "temperature": 0})
    return [
        "## Chat",
        "",
        f"An instruct model: every prompt goes through the chat template in `model.gguf` "
        f"(`tokenizer.chat_template`, sha256 `{prompts.get('chat_template_sha256', '?')}`), and it was evaluated",
        f"that way, with special tokens parsed and tool calls parsed in the `{prompts.get('tool_call_format')}` syntax.",
        "Greedy decoding, as evaluated. llama-server (`--jinja` applies the GGUF's template and parses tool calls):",
        "",
        "```bash",
        "llama-server -m BUNDLE/model.gguf --jinja --temp 0 --repeat-penalty 1 --no-repack --port 8080 &",
        f"curl -s http://127.0.0.1:8080/v1/chat/completions -d '{chat}'",
        f"curl -s http://127.0.0.1:8080/v1/chat/completions -d '{tool}'",
        "```",
        "",
        "The second answer's `choices[0].message.tool_calls` holds the call. Ollama, with this folder's Modelfile",
        "(its TEMPLATE renders this template; `PARAMETER stop` ends a turn where the template does):",
        "",
        "```bash",
        f"cd BUNDLE && ollama create {bundle} -f Modelfile",
        f"curl -s http://127.0.0.1:11434/api/chat -d '{json.dumps({'model': bundle, 'stream': False, **json.loads(tool)})}'",
        "```",
        "",
        "llama-cpp-python renders the file's template too (`llm` as above); it returns a tool call as text,",
        "in the model's own syntax, for you to parse:",
        "",
        "```python",
        f"reply = llm.create_chat_completion(messages={_CHAT_EXAMPLE!r}, temperature=0, max_tokens=16)",
        "print(reply['choices'][0]['message']['content'])",
        f"tool = {_TOOL_EXAMPLE!r}",
        "reply = llm.create_chat_completion(messages=[{'role': 'user', 'content': 'Convert 120 EUR to USD.'}],",
        "                                   tools=[tool], temperature=0, max_tokens=64)",
        "print(reply['choices'][0]['message']['content'])  # <tool_call>{...}</tool_call>",
        "```",
        "",
    ]


def _python_instructions(lines: list[str], needs: str) -> Callable[[str], list[str]]:
    def render(bundle: str) -> list[str]:
        return [f"Needs {needs}. A path, never a Hub id: resolve it, and load with `local_files_only`.", "",
                "```python", "from pathlib import Path", *lines,
                f"model = load(Path('artifacts/package/{bundle}').resolve())  # or wherever this folder is", "```"]

    return render


_GPTQMODEL_LOAD = ["from gptqmodel import GPTQModel", "",
                   "def load(path): return GPTQModel.load(str(path), device='cpu', local_files_only=True)  # or 'cuda'"]
_TRANSFORMERS_LOAD = ["from transformers import AutoModelForCausalLM", "",
                      "def load(path): return AutoModelForCausalLM.from_pretrained(str(path), "
                      "device_map='cpu', local_files_only=True)"]
_GPTQMODEL_NEEDS = "`pip install gptqmodel==7.6.0 torch==2.13.0` (validated through GPTQModel's loader and kernels)"
RUN_INSTRUCTIONS: dict[str, Callable[[str], list[str]]] = {
    "gptq": _python_instructions(_GPTQMODEL_LOAD, _GPTQMODEL_NEEDS),
    "rtn": _python_instructions(_GPTQMODEL_LOAD, _GPTQMODEL_NEEDS),
    "mixed": _python_instructions(_GPTQMODEL_LOAD, _GPTQMODEL_NEEDS),
    "awq": _python_instructions(_GPTQMODEL_LOAD, _GPTQMODEL_NEEDS),
    "bnb": _python_instructions(_TRANSFORMERS_LOAD, "`pip install transformers bitsandbytes==0.50.2 torch==2.13.0`"),
    "dense": _python_instructions(_TRANSFORMERS_LOAD, "`pip install transformers torch==2.13.0`"),
    "gguf": _gguf_instructions,
}


# Ollama's Go template for the ChatML family with tool calls in <tool_call> tags: the text
# quantbuild's chat template (quantbuild.baseline.chat) renders, turn for turn. Ollama writes
# tool definitions and arguments as compact JSON where Jinja's tojson puts a space after
# ',' and ':'; everything else is the same text.
CHATML_TOOLS_TEMPLATE = """{{- if or .System .Tools }}<|im_start|>system
{{ if .System }}{{ .System }}{{ end }}
{{- if .Tools }}{{ if .System }}

{{ end }}Tools you may call, one signature per line:
<tools>
{{- range .Tools }}
{{ . }}
{{- end }}
</tools>
Call one as <tool_call>
{"name": <name>, "arguments": <object>}
</tool_call>{{ end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{- if .Content }}
{{ .Content }}
{{- end }}
{{- range .ToolCalls }}
<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>
{{- end }}<|im_end|>
{{ else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def modelfile(manifest: dict[str, Any], chat: Optional[ChatFormat] = None,
              context_length: Optional[int] = None) -> str:
    """An Ollama Modelfile for the bundle's GGUF, decoding as it was evaluated: greedy, with
    no repetition penalty (Ollama's default is 1.1, which changes the argmax the gate
    measured), over the model's trained context (`context_length`, from the GGUF). A base
    model takes the prompt raw; an instruct model gets the template it was evaluated with
    (the ChatML/<tool_call> family written as Ollama's Go template; any other template is
    left to Ollama, which reads it from the GGUF) and stops at its end-of-turn tokens."""
    context = manifest["evaluation"]["variant"].get("memory", {}).get("by_context", {})
    num_ctx = context_length or max((int(length) for length in context), default=1024)
    kv = manifest["variant"]["parameters"].get("kv_cache_type", "f16")
    lines = [f"# {manifest['bundle']}: built by quantbuild; evaluated in llama.cpp with a {kv} KV cache.",
             "FROM ./model.gguf"]
    if chat is None or chat.template is None:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    elif "<|im_start|>" in chat.template and tool_calls.detect(chat.template) == tool_calls.HERMES:
        lines.append(f'TEMPLATE """{CHATML_TOOLS_TEMPLATE}"""')
    else:
        lines.append("# TEMPLATE: the chat template in model.gguf (tokenizer.chat_template), as Ollama maps it")
    for stop in chat_stops(chat):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join([*lines, "PARAMETER temperature 0", "PARAMETER repeat_penalty 1", f"PARAMETER num_ctx {num_ctx}",
                      ""])


def _card_example(bundle: Path, extra: Optional[dict[str, Path]]) -> Optional[tuple[str, str]]:
    """A probe the released variant answered right on the first target it was validated for
    (its behaviour.json, as packaged), for the card to show with that answer."""
    from quantbuild.behaviour import BEHAVIOUR, card_example
    from quantbuild.hashing import read_json

    records = sorted(name for name in (extra or {}) if name.endswith(f"/{BEHAVIOUR}"))
    return card_example(read_json(bundle / records[0])) if records else None


def chat_stops(chat: Optional[ChatFormat]) -> list[str]:
    """The end-of-turn strings an instruct model's template closes a turn with, and its EOS."""
    if chat is None or chat.template is None:
        return []
    known = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")
    return sorted({token for token in known if token in chat.template} | ({chat.eos_token} if chat.eos_token else set()))


def build_bundle(out: Path, bundle_name: str, model_dir: Path, lineage: dict[str, Any],
                 signing_key: Path | None = None, extra: Optional[dict[str, Path]] = None) -> dict[str, Any]:
    """`out/` replaced by a folder holding the one bundle `<bundle_name>/` (`write_bundle`)."""
    with staged_dir(out) as staging:
        return write_bundle(staging / bundle_name, model_dir, lineage, signing_key, extra)


def write_bundle(bundle: Path, model_dir: Path, lineage: dict[str, Any], signing_key: Path | None = None,
                 extra: Optional[dict[str, Path]] = None) -> dict[str, Any]:
    """Copy the model into the new folder `bundle`, and `extra` (path in the bundle -> file,
    e.g. each target's probes under `targets/<target>/`), write its card and provenance,
    then the manifest, then (with `signing_key`) the signature over all of them."""
    from quantbuild.release.signing import sign_bundle, sign_gguf, signing_record

    signing = signing_record(signing_key) if signing_key is not None else None
    copied = [source for source in model_dir.iterdir() if source.is_file()] + list((extra or {}).values())
    require_space(bundle.parent, sum(source.stat().st_size for source in copied))
    bundle.mkdir()
    for source in sorted(model_dir.iterdir()):
        if source.is_file():
            shutil.copyfile(source, bundle / source.name)
    if signing_key is not None and (bundle / MODEL_FILE).is_file():
        sign_gguf(bundle / MODEL_FILE, signing_key)  # the file travels alone: it carries its own signature
    for name, source in sorted((extra or {}).items()):
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, bundle / name)
    manifest: dict[str, Any] = {"schema": SCHEMA, "bundle": bundle.name, **lineage}
    (bundle / CARD).write_text(model_card(manifest, _card_example(bundle, extra)), encoding="utf-8")
    if lineage["variant"]["method"] == "gguf":
        chat = chat_format(LoadSpec(LLAMA_CPP, bundle / MODEL_FILE))
        (bundle / MODELFILE).write_text(modelfile(manifest, chat, trained_context(bundle / MODEL_FILE)),
                                        encoding="utf-8")
    subjects = {name: sha256_file(path) for name, path in _files(bundle)}
    write_json(bundle / PROVENANCE, statement(subjects, lineage))
    manifest["files"] = {name: {"sha256": sha256_file(path), "size": path.stat().st_size}
                         for name, path in _files(bundle)}
    if signing is not None:
        manifest["signing"] = signing
    write_json(bundle / MANIFEST, manifest)
    if signing_key is not None:
        sign_bundle(bundle, signing_key)
    return manifest


def _files(bundle: Path) -> list[tuple[str, Path]]:
    """Every file in the bundle by its path there (`targets/llama.cpp-cpu/behaviour.json`)."""
    return sorted((path.relative_to(bundle).as_posix(), path) for path in bundle.rglob("*") if path.is_file())

