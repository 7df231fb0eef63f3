"""emo-edge: a deployment compiler for EMO mixture-of-experts language models."""

__version__ = "0.1.0"
