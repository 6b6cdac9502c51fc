"""Verification of a draft against the target: the one function every speculative method goes through."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.config import SamplingParams
from tandem import kernels
from tandem.sampling import process_logits


@dataclass
class Verdict:
    """tokens [B, k+1] long: per row, n_accepted[b] accepted draft tokens, then ONE recovered or bonus token, then
    -1 padding. n_accepted [B] long. Row b emits tokens[b, :n_accepted[b] + 1]."""

    tokens: torch.Tensor
    n_accepted: torch.Tensor

    def emitted(self, b: int = 0) -> list[int]:
        return self.tokens[b, : int(self.n_accepted[b]) + 1].tolist()


def verify(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
           sampling: SamplingParams, generator: torch.Generator | None = None) -> Verdict:
    """Decide which draft tokens the target keeps, and the token that follows them. Lossless.

    Shapes:  draft_tokens  [B, k]        d_1..d_k, drafted after the last emitted token x
             draft_probs   [B, k, V]     q_i: the distribution d_i was sampled from, or None (deterministic drafts)
             target_logits [B, k+1, V]   row i = target logits after [x, d_1..d_i] (row 0: after x alone)
             -> Verdict(tokens [B, k+1], n_accepted [B])

    Terms (as in vLLM's rejection sampler):
      accepted  -- draft tokens d_1..d_a that the target keeps (a = n_accepted, 0 <= a <= k).
      recovered -- when d_{a+1} is rejected (a < k): the token emitted in its place, drawn from the target at row a
                   (greedy: its argmax; sampled: see below). Always emitted, never a draft token.
      bonus     -- when all k are accepted: the token drawn from the target's last row k (free: same forward).
      Every round therefore emits a + 1 tokens: tokens[:, :a+1] = [d_1..d_a, recovered | bonus].

    The target distribution p_i = tandem.sampling.process_logits(target_logits[:, i], sampling): exactly the
    temperature -> top-k -> top-p -> min-p processing plain sampling uses, so speculative output is distributed
    as plain output.
      greedy (T = 0): accept while d_i == argmax p_i (exact equality); then the target's own argmax.
      T > 0, draft_probs None (deterministic drafts, q = one-hot(d_i)) -- sample-and-compare: draw y_i ~ p_i;
          accept if y_i == d_i, else emit y_i as the recovered token. (= p/q rejection with one-hot q: accept with
          probability p_i(d_i); a rejection's y_i is p_i conditioned on != d_i = norm(max(0, p_i - q_i)).)
      T > 0, draft_probs given (sampled drafts) -- p/q rejection: accept d_i with probability
          min(1, p_i(d_i) / q_i(d_i)); on rejection emit a token from norm(max(0, p_i - q_i)).
      bonus (all accepted): a token from p_k.
    Randomness comes only from `generator`, in a fixed order (per draft position, for all rows at once: the
    comparison draw, then the recovered draws of the rows rejected there; last the bonus draws), so a seeded run
    is reproducible. Greedy verification draws nothing.
    """
    B, k = draft_tokens.shape
    V = target_logits.shape[-1]
    assert target_logits.shape[:2] == (B, k + 1), (tuple(target_logits.shape), B, k)
    device = target_logits.device
    draft_tokens = draft_tokens.to(device)
    out = torch.full((B, k + 1), -1, dtype=torch.long, device=device)
    n_acc = torch.zeros(B, dtype=torch.long, device=device)

    if sampling.greedy:
        target = kernels.argmax(target_logits.float())  # [B, k+1]
        match = (draft_tokens == target[:, :k]).long()  # [B, k]
        n_acc = match.cumprod(-1).sum(-1) if k else n_acc  # length of the all-equal prefix
        keep = torch.arange(k, device=device)[None] < n_acc[:, None]
        out[:, :k] = torch.where(keep, draft_tokens, out[:, :k])
        out.scatter_(1, n_acc[:, None], target.gather(1, n_acc[:, None]))  # recovered or bonus
        return Verdict(out, n_acc)

    p = process_logits(target_logits.reshape(B * (k + 1), V), sampling).view(B, k + 1, V)
    alive = torch.ones(B, dtype=torch.bool, device=device)  # rows whose drafts were all accepted so far
    for i in range(k):
        d = draft_tokens[:, i]
        if draft_probs is None:  # sample-and-compare
            y = torch.multinomial(p[:, i], 1, generator=generator).squeeze(1)
            ok = y == d
            rejected = alive & ~ok
            out[rejected, i] = y[rejected]
        else:  # p/q rejection
            q = draft_probs[:, i].to(device).float()
            u = torch.rand(B, generator=generator, device=device)
            pd = p[:, i].gather(1, d[:, None]).squeeze(1)
            qd = q.gather(1, d[:, None]).squeeze(1)
            ok = (qd > 0) & (u * qd <= pd)  # u <= p/q: accept with probability min(1, p/q)
            rejected = alive & ~ok
            if bool(rejected.any()):
                residual = (p[rejected, i] - q[rejected]).clamp(min=0)
                s = residual.sum(-1, keepdim=True)
                # s == 0 only when p == q, where rejection has probability 0; fall back to p to stay defined
                dist = torch.where(s > 0, residual / s.clamp(min=1e-30), p[rejected, i])
                out[rejected, i] = torch.multinomial(dist, 1, generator=generator).squeeze(1)
        accepted = alive & ok
        out[accepted, i] = d[accepted]
        n_acc += accepted.long()
        alive = accepted
        if not bool(alive.any()):
            break
    if bool(alive.any()):  # bonus from the last row
        out[alive, k] = torch.multinomial(p[alive, k], 1, generator=generator).squeeze(1)
    return Verdict(out, n_acc)


def verify_tree(tokens: list[int], parents: list[int], target_logits: torch.Tensor, sampling: SamplingParams,
                generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
    """Walk a deterministic draft tree (a chain: the one-branch tree) -> (accepted path's node indices, emitted
    tokens = the path's tokens + one recovered/bonus token). Lossless.

    tokens [N], parents [N] (-1: the root x, the last emitted token), target_logits [N+1, V]: row 0 = after x,
    row i+1 = after the path to node i (tree attention: bitwise what that path verified as a chain gives).
      greedy (T = 0): from the root, y = argmax of the current row; move to the child carrying y, if any, else
          emit y and stop: the longest path the target agrees with, then its own token.
      T > 0 (multi-candidate sample-and-compare): y ~ p(current row), p = process_logits (plain sampling's
          distribution); move to the child carrying y, else emit y and stop.
    Why lossless: every emitted token is one draw from the target's distribution given everything emitted before
    it, as in plain sampling; the draft only decides whether the next row is already computed (a child whose
    token the draw hit has its row), never which token is drawn. With one child per node this is exactly verify()'s
    sample-and-compare (SpecInfer's recursive rejection sampling with one-hot drafts: rejecting child c
    leaves norm(p - p(c) one-hot(c)), from which the next child is tried; the same as drawing y ~ p once and
    looking it up among the children). Randomness: one draw per emitted token, in order.
    """
    children: dict[int, dict[int, int]] = {}
    for i, (t, p) in enumerate(zip(tokens, parents)):
        children.setdefault(p, {}).setdefault(int(t), i)
    if sampling.greedy:
        target = kernels.argmax(target_logits.float()).tolist()  # [N+1]
        draw = lambda row: target[row]  # noqa: E731
    else:
        p = process_logits(target_logits, sampling)  # [N+1, V]
        draw = lambda row: int(torch.multinomial(p[row:row + 1], 1, generator=generator)[0, 0])  # noqa: E731
    path, emitted, cur = [], [], -1
    while True:
        y = draw(cur + 1)
        emitted.append(y)
        nxt = children.get(cur, {}).get(y)
        if nxt is None:
            return path, emitted
        path.append(nxt)
        cur = nxt
