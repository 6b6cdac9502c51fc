"""Tandem: lossless speculative decoding with MTP drafters."""

__version__ = "0.1.0"
