"""The row-wise log-softmax every KL divergence of the evaluation and the plan validation
starts from (`quantbuild.evaluation.distributions.log_softmax`), against the float64 pass it
replaced, per 1,024 positions at the vocabulary sizes of the bundled models (4,096), of
Llama 2 / Mistral (32,000) and of Llama 3 (128,256); same random logits, same process.

    python bench/log_softmax.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchlib import save, table


def main() -> None:
    import numpy as np

    from quantbuild.evaluation.distributions import log_softmax

    def float64_pass(logits):  # what quantbuild did before: the whole pass in float64, then float32
        shifted = logits.astype(np.float64)
        shifted = shifted - shifted.max(axis=-1, keepdims=True)
        return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, results = [], {}
    for vocab in (4096, 32000, 128256):
        logits = (rng.standard_normal((1024, vocab)) * 3).astype(np.float32)
        times = {"float64": [], "float32": []}
        for _ in range(args.repeats):  # interleaved
            for name, function in (("float64", float64_pass), ("float32", log_softmax)):
                started = time.perf_counter()
                function(logits)
                times[name].append(time.perf_counter() - started)
        old, new = float64_pass(logits), log_softmax(logits)
        difference = float(np.abs(old - new).max())
        # what a KL divergence between two nearby distributions sees: the same rows, one nudged
        nudged = logits + (rng.standard_normal(logits.shape) * 0.01).astype(np.float32)
        kl = {name: float((np.exp(p) * (p - q)).sum(-1).mean()) for name, p, q in
              (("float64", old, float64_pass(nudged)), ("float32", new, log_softmax(nudged)))}
        medians = {name: statistics.median(values) for name, values in times.items()}
        results[vocab] = {"seconds": medians, "max_abs_difference": difference, "kl": kl}
        rows.append([vocab, f"{medians['float64']:.3f}", f"{medians['float32']:.3f}",
                     f"{medians['float64'] / medians['float32']:.1f}x", f"{difference:.1e}",
                     f"{kl['float64']:.8f} / {kl['float32']:.8f}"])
    print(table(["vocabulary", "float64 pass (s, median)", "float32 exp, float64 normaliser (s)", "speed-up",
                 "largest difference", "mean KL of a nudged copy (before / after)"], rows))
    save("log_softmax", results)


if __name__ == "__main__":
    main()
