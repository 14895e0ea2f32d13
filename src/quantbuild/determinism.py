"""Seeds and deterministic kernels, set once at the start of every stage that computes."""

import os
import random

from quantbuild.fingerprint import DETERMINISM


def make_deterministic(seed: int, torch: bool = True) -> None:
    """Seed Python and numpy, and torch with deterministic kernels unless `torch` is false
    (a stage on llama.cpp alone never loads torch: on a CUDA machine the two crash in one
    process)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISM["cublas_workspace_config"])
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    if torch:
        import torch as torch_module

        torch_module.manual_seed(seed)
        torch_module.use_deterministic_algorithms(True, warn_only=True)
