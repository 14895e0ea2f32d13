"""Where does the importance matrix help a stock preset, tensor role by tensor role?

    python bench/imatrix_roles.py [--model data/baseline/workflow-chat-33m] [--preset Q3_K_S] [--tokens 16384] [--raw]

On the 33M chat model Q3_K_S with and without the importance matrix split the three held-out
texts (without it best on eval-family text, with it on calibration-like text and prose), so
no file of the two is never worse than the other on every text (issue #28). This quantizes
`--preset` without the matrix, with it, and with it on one decoder tensor role only
(`--include-weights .attn_k.`, ...), and measures each on the validation texts (seed 5001,
what the pipeline chooses on) and on test texts (seed 6001, which choose nothing); then the
pipeline's own repair (`plan_validation.drop_roles`: from every role, drop the one whose
dropping lowers the worst ratio over the validation texts most, while one does) and its
result on the test texts. KL divergence to the F16 GGUF in llama.cpp, 2 threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, save, table  # noqa: E402
from gguf_variants import _prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "data" / "baseline" / "workflow-chat-33m")
    parser.add_argument("--preset", default="Q3_K_S")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--raw", action="store_true",
                        help="an instruct model's texts raw, not through its chat template")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from quantbuild.gguf_artifacts import BASE_FILE, IMATRIX_FILE
    from quantbuild.plan_validation import (TEXTS, decoder_roles, drop_roles, kl_divergence, reference, role_args,
                                            validation_texts)
    from quantbuild.prompts import tokenizer_template
    from quantbuild.runtimes.llama_build import run_tool

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        _prepare(work, baseline=args.model)
        base, matrix = work / "base" / BASE_FILE, work / "imatrix" / IMATRIX_FILE
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        count = lambda value: len(tokenizer(value, verbose=False)["input_ids"])  # noqa: E731
        # rendered as the pipeline's validation renders them (an instruct model's through its
        # template), or raw with --raw (how this was first measured)
        template = None if args.raw else tokenizer_template(tokenizer)
        special = template is not None
        sets = {"validation": validation_texts(args.tokens, count, template=template),
                "test": validation_texts(args.tokens, count, seed=6001, template=template)}
        references = {name: reference(base, drawn, 2, False, special=special) for name, drawn in sets.items()}
        roles = decoder_roles(base)
        results: dict[str, dict] = {}

        def measure(label: str, kept: frozenset | None, which: tuple[str, ...] = ("validation", "test")) -> dict:
            key = (label, which)
            if key not in results:
                matrix_args = [] if kept is None else role_args(matrix, kept)
                path = work / "candidate.gguf"
                run_tool("llama-quantize", [*matrix_args, str(base), str(path), args.preset, "2"], label)
                results[key] = {name: {kind: entry["kld_mean"] for kind, entry in
                                       kl_divergence(path, references[name], sets[name], 2, False,
                                                                     special=special).items()}
                                for name in which}
                path.unlink()
            return results[key]

        rows = {args.preset: measure(args.preset, None), f"{args.preset}+imatrix": measure("all", frozenset(roles))}
        for role in roles:
            rows[f"+imatrix on {role} only"] = measure(role, frozenset({role}))
        floor = {name: {kind: min(rows[args.preset][name][kind], rows[f"{args.preset}+imatrix"][name][kind])
                        for kind in TEXTS} for name in sets}

        def worst(texts: dict, name: str) -> float:
            return round(max(texts[kind] / floor[name][kind] for kind in TEXTS), 4)
        kept, best, scored = drop_roles(roles, lambda kept: worst(
            measure(",".join(sorted(kept)), kept, ("validation",))["validation"], "validation"))
        rows[f"repaired: +imatrix on {', '.join(sorted(kept))}"] = measure(",".join(sorted(kept)) + " final", kept)
    print(f"model {args.model.name}, {args.preset}, texts {'chat template' if special else 'raw'}; "
          f"{args.tokens} tokens per set; ratio: KLD / the better of "
          f"{args.preset} and {args.preset}+imatrix on that text; the repair scored {scored} subsets; "
          f"{time.perf_counter() - started:.0f} s")
    print(table(["file", *[f"{name} {kind}" for name in sets for kind in TEXTS],
                 *[f"{name} worst ratio" for name in sets]],
                [[label, *[f"{texts[name][kind]:.6f}" for name in sets for kind in TEXTS],
                  *[f"{worst(texts[name], name):.3f}" for name in sets]] for label, texts in rows.items()]))
    save(f"imatrix_roles_{args.model.name}_{args.preset}{'_raw' if args.raw else ''}", {"rows": rows, "kept": sorted(kept), "scored": scored})


if __name__ == "__main__":
    main()
