"""The drafter's run-time step (greedy_step: sparse head without a [V] vector) agrees with forward()'s logits."""

import torch

from tandem.kvcache import KVCache
from tandem.models import gemma3
from tandem.train.assistant_init import assistant_config, build_assistant
from tandem.train.clusters import balanced_kmeans


def test_greedy_step_matches_full_logits():
    torch.manual_seed(0)
    args = gemma3.ModelArgs(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    target = gemma3.Model(args).eval()
    cache = KVCache(target.kv_specs(), 2, 32)
    toks = torch.randint(0, 256, (2, 20))
    out = target(toks, torch.arange(20).expand(2, 20), cache)
    for centroids in (0, 8):
        cfg = assistant_config(target, layers=2, intermediate=64, centroids=centroids, top_k_clusters=3)
        asst = build_assistant(cfg, target, target.model.embed_tokens.weight.detach(), seed=1)
        if centroids:
            order, _ = balanced_kmeans(target.model.embed_tokens.weight.detach(), 8, log=lambda *_: None)
            asst.masked_embedding.token_ordering.copy_(order)
        x = torch.cat([target.embed(toks[:, 5:15]), out.hidden[:, 4:14]], -1)
        pos = torch.arange(5, 15).expand(2, 10)
        with torch.no_grad():
            full = asst(x, pos, cache, kv_positions=pos - 1)
            tok, top, h = asst.greedy_step(x, pos, cache, torch.arange(2), pos - 1)
        p = torch.softmax(full.logits, -1)
        assert torch.equal(tok, full.logits.argmax(-1))
        torch.testing.assert_close(top, p.max(-1).values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h, full.hidden)


def test_packed_sparse_head_reads_only_chosen_panels():
    """With a packed (q8_0 / bf16) head the sparse head runs a GEMM over the chosen clusters' panels only: each
    logit is bitwise the full head's, and greedy_step still agrees with forward()."""
    import pytest

    from tandem import kernels
    from tandem.kernels._ext import ext
    if ext() is None:
        pytest.skip("C++ kernels unavailable")
    torch.manual_seed(0)
    args = gemma3.ModelArgs(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    for fmt in ("q8_0", "bf16"):
        target = gemma3.Model(args).eval()
        cfg = assistant_config(target, layers=1, intermediate=64, centroids=8, top_k_clusters=3)
        asst = build_assistant(cfg, target, target.model.embed_tokens.weight.detach(), seed=1)
        order, _ = balanced_kmeans(target.model.embed_tokens.weight.detach(), 8, log=lambda *_: None)
        asst.masked_embedding.token_ordering.copy_(order)
        kernels.prepare(target, fmt)
        asst.lm_head = target.lm_head  # as tandem.spec loads a shared-embedding drafter
        cache = KVCache(target.kv_specs(), 1, 32)
        toks = torch.randint(0, 1024, (1, 20))
        with torch.inference_mode():
            out = target(toks, torch.arange(20)[None], cache)
            y = torch.randn(1, 3, 64)
            ids, sel = asst.masked_embedding.select(y, asst.lm_head)
            full = target.lm_head(y)  # [1, 3, V] the whole packed head, same kernel arithmetic
            assert torch.equal(sel, full.gather(-1, ids)), fmt
            assert getattr(asst.masked_embedding, "_packed_cache", None) is not None  # the panel path ran
            x = torch.cat([target.embed(toks[:, 5:6]), out.hidden[:, 4:5]], -1)
            pos = torch.tensor([[5]])
            logits = asst(x, pos, cache, kv_positions=pos - 1).logits
            tok, top, _ = asst.greedy_step(x, pos, cache, torch.arange(1), pos - 1)
        assert torch.equal(tok, logits.argmax(-1)), fmt
        torch.testing.assert_close(top, torch.softmax(logits, -1).max(-1).values, rtol=1e-5, atol=1e-6)
