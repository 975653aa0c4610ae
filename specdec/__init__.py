"""specdec: a lab for benchmarking speculative decoding of LLMs."""

__version__ = "0.1.0"
