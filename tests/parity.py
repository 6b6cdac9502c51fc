"""Checks the family parity tests share: our model against transformers' reference outputs on the same prompts."""

import torch

TOL = 1e-4


def check(logits, hidden, ref_logits, ref_hidden, tol=TOL):
    el, eh = (logits - ref_logits).abs().max().item(), (hidden - ref_hidden).abs().max().item()
    assert el < tol and eh < tol, f"max abs err logits {el:.2e} hidden {eh:.2e}"
    return el, eh


def run_chunks(ours, tokens, chunks, slot=0, cache=None, max_len=32):
    """Feed one prompt through a (fresh) cache in chunks of the given sizes; returns logits, hidden [1, N, *]."""
    cache = cache if cache is not None else ours.make_cache(2, max_len, k_type="f32")
    logits, hidden, p = [], [], 0
    with torch.no_grad():
        for c in chunks:
            o = ours(tokens[None, p:p + c], torch.arange(p, p + c)[None], cache, torch.tensor([slot]))
            logits.append(o.logits)
            hidden.append(o.hidden)
            p += c
    return torch.cat(logits, 1), torch.cat(hidden, 1)


def check_batched_slots(ours, prompts, ref_logits, ref_hidden, cache):
    """Two prompts in one batch (reversed slots, right padding, per-row positions) == the reference for each, then 5
    batched decode steps; returns the last step's output."""
    slots = torch.tensor([1, 0])
    tok, pos = prompts[:, :9].clone(), torch.arange(9).repeat(2, 1)
    tok[1, 6:], pos[1, 6:] = 0, -1  # row 1 has a 6-token prompt
    with torch.no_grad():
        o = ours(tok, pos, cache, slots)
        check(o.logits[0:1], o.hidden[0:1], ref_logits[0:1, :9], ref_hidden[0:1, :9])
        check(o.logits[1:2, :6], o.hidden[1:2, :6], ref_logits[1:2, :6], ref_hidden[1:2, :6])
        for s in range(5):  # row 0 decodes positions 9..13, row 1 positions 6..10
            p = torch.tensor([[9 + s], [6 + s]])
            o = ours(torch.stack([prompts[0, 9 + s], prompts[1, 6 + s]])[:, None], p, cache, slots)
            check(o.logits[0:1], o.hidden[0:1], ref_logits[0:1, 9 + s:10 + s], ref_hidden[0:1, 9 + s:10 + s])
            check(o.logits[1:2], o.hidden[1:2], ref_logits[1:2, 6 + s:7 + s], ref_hidden[1:2, 6 + s:7 + s])
    return o
