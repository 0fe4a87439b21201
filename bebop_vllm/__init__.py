"""Bebop: MTP heads with exact rejection sampling for vLLM speculative decoding."""

__version__ = "0.1.0"
