"""moe-local: run Mixture-of-Experts language models larger than your GPU."""

__version__ = "0.1.0"
