"""One data file per GGUF `general.architecture`: metadata keys -> HF config, tensor keymap, value fix-ups.

To support a new architecture, add a module defining `ARCH = GGUFArch(...)` and list it here.
"""

from __future__ import annotations

from tandem.loading.gguf_archs import (deepseek2, gemma3, gemma4_assistant, glm4moe, llama, qwen2, qwen3, qwen3moe,
                                      qwen35)
from tandem.loading.gguf_archs.base import GGUFArch

ARCHS: dict[str, GGUFArch] = {
    "deepseek2": deepseek2.ARCH,
    "gemma3": gemma3.ARCH,
    gemma4_assistant.NAME: gemma4_assistant.ARCH,
    "glm4moe": glm4moe.ARCH,
    "llama": llama.ARCH,
    "qwen2": qwen2.ARCH,
    "qwen3": qwen3.ARCH,
    "qwen3moe": qwen3moe.ARCH,
    "qwen35": qwen35.ARCH,
    "qwen35moe": qwen35.ARCH_MOE,
}

__all__ = ["ARCHS", "GGUFArch"]
