"""quantbuild: a declarative build pipeline for reproducible, release-gated quantized models."""

__version__ = "0.1.0"
