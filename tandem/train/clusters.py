"""Vocabulary clustering for the centroid-routed sparse head: equal-size clusters of the LM-head rows.

Balanced spherical k-means: tokens whose head rows point the same way get similar logits for any hidden state,
so the few clusters the centroid head picks hold the likely tokens. Equal sizes are what HF's layout needs
(`token_ordering` viewed as [C, V/C]).
"""

from __future__ import annotations

import numpy as np
import torch


def _balanced_assign(scores_top: np.ndarray, idx_top: np.ndarray, n_clusters: int, size: int,
                     all_scores_fn) -> np.ndarray:
    """Greedy capacity-constrained assignment: most confident tokens first, each to its best non-full cluster."""
    V = idx_top.shape[0]
    order = np.argsort(-scores_top[:, 0], kind="stable")
    cap = np.full(n_clusters, size, dtype=np.int64)
    assign = np.full(V, -1, dtype=np.int64)
    leftovers = []
    for t in order:
        for c in idx_top[t]:
            if cap[c] > 0:
                cap[c] -= 1
                assign[t] = c
                break
        else:
            leftovers.append(t)
    for t in leftovers:  # rare: all preferred clusters full; take the best cluster with room
        s = all_scores_fn(t)
        s[cap == 0] = -np.inf
        c = int(np.argmax(s))
        cap[c] -= 1
        assign[t] = c
    return assign


@torch.no_grad()
def balanced_kmeans(weight: torch.Tensor, n_clusters: int, iters: int = 4, prefs: int = 8, seed: int = 0,
                    chunk: int = 32768, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [V, D] -> (token_ordering [V] long: cluster c's tokens at [c*V/C, (c+1)*V/C), centroids [C, D])."""
    V, D = weight.shape
    if V % n_clusters:
        raise ValueError(f"vocab {V} is not divisible by {n_clusters} clusters")
    size = V // n_clusters
    x = torch.nn.functional.normalize(weight.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(V, generator=g)[:n_clusters]].clone()
    assign = None
    for it in range(iters):
        top_s, top_i = [], []
        for i in range(0, V, chunk):
            s = x[i:i + chunk] @ cent.T
            v, j = s.topk(prefs, dim=-1)
            top_s.append(v)
            top_i.append(j)
        ts, ti = torch.cat(top_s).numpy(), torch.cat(top_i).numpy()
        cn = cent.numpy()
        xn = x.numpy()
        assign = _balanced_assign(ts, ti, n_clusters, size, lambda t: (cn @ xn[t]).astype(np.float64))
        a = torch.from_numpy(assign)
        cent = torch.zeros_like(cent).index_add_(0, a, x)
        cent = torch.nn.functional.normalize(cent, dim=-1)
        log(f"clusters: iteration {it + 1}/{iters}, mean cosine to centroid "
            f"{float((x * cent[a]).sum(-1).mean()):.3f}")
    order = torch.from_numpy(np.argsort(assign, kind="stable")).long()
    return order, cent
