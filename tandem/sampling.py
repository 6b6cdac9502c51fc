"""logits -> processed distribution -> token. Pure functions; plain sampling and verification share them."""

from __future__ import annotations

import torch

from tandem.config import SamplingParams


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [N, V] -> probs [N, V] (fp32) after temperature -> top_k -> top_p -> min_p.

    Greedy (temperature 0) returns the one-hot of the argmax, so every caller can treat it as a distribution.
    """
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        # drop tokens whose preceding mass already reaches top_p (the top token always stays)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter_(-1, idx, drop_sorted), 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs [N, V] -> ids [N]. One-hot rows (greedy) are exact argmax without consuming randomness."""
    one_hot = probs.max(-1).values == 1.0
    if bool(one_hot.all()):
        return probs.argmax(-1)
    ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(one_hot, probs.argmax(-1), ids)


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
