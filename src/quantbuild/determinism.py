"""Seeds and deterministic kernels, set once at the start of every torch-using stage."""

import os
import random

from quantbuild.fingerprint import DETERMINISM


def make_deterministic(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISM["cublas_workspace_config"])
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
