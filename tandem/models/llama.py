"""Llama 2 / 3.x (llama3 RoPE scaling), SmolLM2, Mistral (sliding window on every layer when set): HF model_type
`llama` and `mistral`. Everything is the shared decoder (models/decoder.py); nothing here is Llama's own."""

from __future__ import annotations

from tandem.models.decoder import DecoderArgs as ModelArgs
from tandem.models.decoder import DecoderLM as Model

__all__ = ["ModelArgs", "Model"]
