"""The generation loop. The engine is the only place that moves cache lengths.

generate() runs one request on one slot: prefill, then rounds of tandem.engine.speculative.decode_round (the one
loop body, the scheduler's too; a plain request's round has an empty draft), yielding Token events and one
Finished event. Batched serving builds on the same pieces (tandem.engine.batch).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import time
from collections.abc import Iterator
from typing import Any

import torch

from tandem import kernels
from tandem.config import SamplingParams, SpecConfig
from tandem.engine.events import Finished, GenStats, Token
from tandem.engine.speculative import Decoding, SlotSpeculator, decode_round, sample_token
from tandem.engine.stops import StopMatcher
from tandem.errors import RequestError
from tandem.kvcache.cache import TreeRows
from tandem.kvcache.prefix import PrefixCache
from tandem.models.base import Output
from tandem.sampling import make_generator
from tandem.spec.policy import speculates

PREFILL_CHUNK = 512  # prefill runs chunks [g, g + PREFILL_CHUNK) on this fixed grid from 0 (tandem.kvcache.prefix)
log = logging.getLogger("tandem.engine")


def _stream_decoder(tokenizer: Any):
    """The tokenizer's incremental decoder (`stream_decoder()`, or `stream()` in tandem.tokenizer)."""
    make = getattr(tokenizer, "stream_decoder", None) or tokenizer.stream
    return make()


class RequestOutput:
    """What happens to each generated token of one request: EOS, detokenization, stop strings, the token budget.

    Shared by Engine.generate and the batch scheduler (tandem.engine.batch) so both emit the same events.
    push() returns the Token event to emit (or None) and sets `reason` once the request is finished.
    """

    def __init__(self, tokenizer: Any, sampling: SamplingParams, prompt_n: int, max_len: int):
        self.stats = GenStats(prompt_n=prompt_n)
        self.eos = set() if sampling.ignore_eos or tokenizer is None else set(tokenizer.eos_ids)
        self.stops = StopMatcher(sampling.stop)
        self.detok = _stream_decoder(tokenizer) if tokenizer is not None else None
        self.budget = min(sampling.max_tokens, max_len - prompt_n)
        self.reason: str | None = None
        if self.detok is not None:
            self._detok_push = getattr(self.detok, "push", None) or self.detok.put

    def push(self, tok: int, from_draft: bool = False) -> Token | None:
        self.stats.predicted_n += 1
        if tok in self.eos:
            self.reason = "stop"
            return None
        piece = self._detok_push(tok) if self.detok is not None else ""
        text, hit = self.stops.push(piece)
        if hit:
            self.reason = "stop"
            return Token(tok, text, from_draft) if text else None
        if self.stats.predicted_n >= self.budget:
            self.reason = "length"
        return Token(tok, text, from_draft)

    def finish(self) -> list[Token | Finished]:
        """The closing events: text held back (pending UTF-8 bytes, a possible stop-string start) unless a stop
        string ended the text, then Finished. A stream that ended early = "length"."""
        reason = self.reason or "length"
        out: list[Token | Finished] = []
        tail, hit = self.stops.push(self.detok.flush() if self.detok is not None else "")
        if not hit:
            more, hit = self.stops.flush()
            tail += more
        if tail:
            out.append(Token(-1, tail, False))
        if hit:
            reason = "stop"
        out.append(Finished(reason, self.stats, self.stops.text))
        return out


def _grid_end(pos: int, n: int) -> int:
    """End of the prefill chunk that starts at pos, for a prompt of n tokens: the next grid point, or n."""
    return min(n, (pos // PREFILL_CHUNK + 1) * PREFILL_CHUNK)


class Engine:
    """Generation over `n_slots` cache slots. The cache comes from the model (`model.make_cache`); a drafter that
    owns a cache gets one sized the same way (slots, context, cache types). prefix_cache_mb > 0: prompts reuse
    cached prefixes of earlier requests (`self.prefix`, tandem.kvcache.prefix) within that many MiB."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, max_len: int = 4096, n_slots: int = 1,
                 device: str | torch.device = "cpu", drafter: Any = None, spec: SpecConfig | None = None,
                 cache_type_k: str = "f32", cache_type_v: str | None = None, prefix_cache_mb: float = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        types = dict(k_type=cache_type_k, v_type=cache_type_v or cache_type_k, device=self.device)
        self.cache = model.make_cache(n_slots, max_len, **types)
        self.drafter = drafter
        if drafter is not None:
            drafter.make_cache(n_slots, max_len, **types)
        # unset n_max / p_min: the drafter's recommendation, else the built-in default
        self.spec = (spec or SpecConfig(enabled=drafter is not None)).resolved(getattr(drafter, "recommended", None))
        self._slot_ids = [torch.tensor([i], device=self.device) for i in range(n_slots)]
        self.prefix = None
        if prefix_cache_mb > 0:
            self.prefix = PrefixCache(self.cache, int(prefix_cache_mb * 2 ** 20), exact=self.exact[0],
                                      grid=PREFILL_CHUNK,
                                      needs_hidden=drafter is not None and drafter.needs_prompt_hidden)
        self.warm_up(types)

    @torch.inference_mode()
    def warm_up(self, cache_types: dict) -> None:
        """Build/load the C++ kernels and run a prefill-sized and a decode-sized forward on a scratch cache, so the
        first request's prompt and decode timings are its own, not the kernels' JIT build and first calls."""
        t = time.perf_counter()
        scratch = self.model.make_cache(1, 8, **cache_types)
        slot = torch.zeros(1, dtype=torch.long, device=self.device)
        for n in (4, 1):
            toks = torch.zeros(1, n, dtype=torch.long, device=self.device)
            pos = torch.arange(n, device=self.device)[None]
            self.model(toks, pos, scratch, slot, logit_rows=slice(-1, None))
        log.info("kernels built and warmed at load (%.2f s): request timings exclude it", time.perf_counter() - t)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    @property
    def exact(self) -> tuple[bool, str]:
        """(exact, reason): True when every target row is row-invariant here (speculative output == plain
        decoding bitwise at T=0); False: speculation keeps the target's distribution only."""
        return kernels.exactness(self.model, self.device)

    def check_ids(self, ids: list[int]) -> None:
        """Token ids outside [0, vocab) never reach a kernel: a RequestError naming the first bad one."""
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    # -- target forwards -----------------------------------------------------------------------------------------
    def describe_drafter(self) -> str:
        """The drafter requests use by default, for people: its own describe(), or `none (plain)`."""
        return self.drafter.describe() if self.drafter is not None and self.spec.enabled else "none (plain)"

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], start: int = 0, keep_hidden: bool = False):
        """Run ids at positions start.. into the slot's cache; returns the Output of the last chunk, its hidden
        (and aux) rows [1, len(ids), *] (all chunks) when keep_hidden."""
        self.check_ids(ids)
        outs = []
        c = 0
        while c < len(ids):  # chunks on the fixed grid, whatever `start` is
            chunk = ids[c:_grid_end(start + c, start + len(ids)) - start]
            toks = torch.tensor([chunk], device=self.device)
            pos = torch.arange(start + c, start + c + len(chunk), device=self.device)[None]
            c += len(chunk)
            out = self.model(toks, pos, self.cache, self._slot_ids[slot], logit_rows=slice(-1, None))
            outs = outs + [out] if keep_hidden else [out]
        self.cache.set_length(slot, start + len(ids))
        return outs[0] if len(outs) == 1 else Output.cat_rows(outs)

    # -- prompts and the prefix cache (both Engine.generate and the batch scheduler go through these) ----------
    def _prefix_on(self, cache_prompt: bool) -> bool:
        return self.prefix is not None and cache_prompt

    def begin_prompt(self, slot: int, ids: list[int], cache_prompt: bool = True) -> tuple[int, list[torch.Tensor]]:
        """Restore the longest cached prefix of ids into the slot: (tokens restored, hidden rows [[n, D]] when the
        prefix cache keeps them for the drafter, else [])."""
        if not self._prefix_on(cache_prompt):
            return 0, []
        m = self.prefix.match(ids)
        if not m.n:
            return 0, []
        h = self.prefix.load(slot, m)
        return m.n, [h] if h is not None else []

    def prefill_chunk(self, slot: int, ids: list[int], pos: int, hidden: list[torch.Tensor], keep_hidden: bool,
                      cache_prompt: bool = True) -> tuple[Output, int]:
        """Prefill the grid chunk of the prompt that starts at pos (the slot holds ids[:pos]); appends its hidden
        rows [c, D] to `hidden` when kept. In grid mode a chunk ending on a grid point is stored as prefix blocks.
        Returns (Output of the chunk, new pos)."""
        end = _grid_end(pos, len(ids))
        store = self._prefix_on(cache_prompt)
        out = self.prefill(slot, ids[pos:end], start=pos)
        if keep_hidden or (store and self.prefix.needs_hidden):
            hidden.append(out.drafter_rows[0])
        if store and not self.prefix.anywhere and end % PREFILL_CHUNK == 0:
            self.prefix.store(slot, ids, end, torch.cat(hidden) if self.prefix.needs_hidden else None)
        return out, end

    def prompt_done(self, slot: int, ids: list[int], hidden: list[torch.Tensor], cache_prompt: bool = True) -> None:
        """After the prompt's last chunk: its blocks become reusable by the next requests (anywhere mode)."""
        if self._prefix_on(cache_prompt) and self.prefix.anywhere:
            self.prefix.store(slot, ids, len(ids), torch.cat(hidden) if self.prefix.needs_hidden else None)

    def slot_done(self, slot: int, tokens: list[int], cache_prompt: bool = True) -> None:
        """A request ended normally: keep the blocks of what its slot holds (prompt + generated tokens fed to the
        target), for the next turn of the conversation. Anywhere mode only (no hidden rows for generated ones)."""
        if self._prefix_on(cache_prompt) and self.prefix.anywhere and not self.prefix.needs_hidden:
            self.prefix.store(slot, tokens, self.cache.lengths[slot])

    @torch.inference_mode()
    def forward_rows(self, slot: int, ids: list[int], logit_rows=None):
        """Forward ids at the slot's next positions and extend the length (benches: a k-row forward's cost)."""
        n = self.cache.lengths[slot]
        toks = torch.tensor([ids], device=self.device)
        pos = torch.arange(n, n + len(ids), device=self.device)[None]
        out = self.model(toks, pos, self.cache, self._slot_ids[slot], logit_rows=logit_rows)
        self.cache.set_length(slot, n + len(ids))
        return out

    @torch.inference_mode()
    def forward_batch(self, slots: list[int], rows: list[list[int]], parents: list[list[int] | None]):
        """ONE target forward over each slot's rows at its next cache entries (rows [x, d_1..d_N]: the pending token,
        then draft nodes), lengths extended by len(rows[b]). parents[b]: node i's parent (-1: x) makes the rows a
        tree: positions n + depth, each node seeing the cache, its ancestors and itself (TreeRows); None: a chain.
        Returns per slot (logits [r, V], hidden [r, D]); the LM head runs only on real rows, not padding."""
        B, T = len(rows), max(map(len, rows))
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.full((B, T), -1, dtype=torch.long)
        trees = any(p is not None for p in parents)
        mask = torch.zeros(B, T, T, dtype=torch.bool) if trees else None
        index = torch.full((B, T), -1, dtype=torch.long) if trees else None
        starts = [self.cache.lengths[s] for s in slots]
        for b, (r, par, n) in enumerate(zip(rows, parents, starts)):
            tokens[b, :len(r)] = torch.tensor(r)
            if par is None:
                depth = list(range(len(r)))
                if trees:
                    mask[b, :len(r), :len(r)] = torch.ones(len(r), len(r), dtype=torch.bool).tril()
            else:
                depth = [0]
                mask[b, 0, 0] = True
                for i, p in enumerate(par):  # row i+1 sees its parent's row's entries and itself
                    depth.append(depth[p + 1] + 1)
                    mask[b, i + 1] = mask[b, p + 1]
                    mask[b, i + 1, i + 1] = True
            positions[b, :len(r)] = n + torch.tensor(depth)
            if trees:
                index[b, :len(r)] = torch.arange(n, n + len(r))
        tree = TreeRows(index, torch.tensor(starts), positions, mask).to(self.device) if trees else None
        dev = self.device
        with self.cache.tree_rows(tree) if trees else contextlib.nullcontext():
            out = self.model(tokens.to(dev), positions.to(dev), self.cache, torch.tensor(slots, device=dev),
                             logit_rows=slice(0, 0))
        hidden = torch.cat([out.hidden[b, :len(r)] for b, r in enumerate(rows)])[:, None]
        logits = self.model.logits(hidden)[:, 0]
        res, o = [], 0
        for b, (s, r) in enumerate(zip(slots, rows)):
            self.cache.set_length(s, starts[b] + len(r))
            res.append((logits[o:o + len(r)], out.drafter_rows[b, :len(r)]))
            o += len(r)
        return res

    # -- requests ------------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: pass token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            try:
                ids = [operator.index(t) for t in prompt]
            except TypeError as e:
                raise RequestError(f"prompt token ids must be integers ({e})") from None
        self.check_ids(ids)
        if not ids:
            raise RequestError("the prompt is empty (0 tokens)")
        if len(ids) >= self.max_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context holds {self.max_len} "
                               f"(prompt + generated tokens must fit)")
        return ids

    def generate(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                 spec: SpecConfig | None = None, slot: int = 0, request_id: str | None = None,
                 add_special_tokens: bool = True, cache_prompt: bool = True) -> Iterator[Token | Finished]:
        sampling = sampling or SamplingParams()
        spec = spec if spec is not None else self.spec
        ids = self.encode(prompt, add_special_tokens)
        req = RequestOutput(self.tokenizer, sampling, len(ids), self.max_len)
        stats = req.stats
        gen = make_generator(sampling.seed, "cpu")

        t0 = time.perf_counter()
        use_spec = speculates(spec, self.drafter)
        keep = use_spec and self.drafter.needs_prompt_hidden
        pos, hidden = self.begin_prompt(slot, ids, cache_prompt)
        stats.cached_n = pos
        while pos < len(ids):
            out, pos = self.prefill_chunk(slot, ids, pos, hidden, keep, cache_prompt)
        self.prompt_done(slot, ids, hidden, cache_prompt)
        if keep:
            out = out.with_drafter_rows(torch.cat(hidden)[None])
        stats.prompt_ms = 1000 * (time.perf_counter() - t0)
        t1 = time.perf_counter()
        sp = SlotSpeculator(self, slot, ids, out, sampling, spec, gen, stats, request_id) if use_spec else None
        state = Decoding(slot, sampling, gen, sp, sample_token(out.logits[:, -1], sampling, gen))
        fed = list(ids)  # the prompt, then every token generated (the slot's cache holds a prefix of this)
        try:
            toks = [(state.pending, False)]
            while True:
                for tok, from_draft in toks:
                    fed.append(tok)
                    ev = req.push(tok, from_draft)
                    if ev is not None:
                        yield ev
                    if req.reason is not None:
                        break
                if req.reason is not None or self.cache.lengths[slot] >= self.max_len:
                    break
                (_, toks), = decode_round(self, [state])[0]  # the scheduler's loop body, for one slot
                state.pending = toks[-1][0]
        finally:
            if sp is not None:
                sp.close()
        self.slot_done(slot, fed, cache_prompt)
        stats.predicted_ms = 1000 * (time.perf_counter() - t1)
        yield from req.finish()

    def complete(self, prompt: str | list[int], sampling: SamplingParams | None = None, **kw) -> tuple[list[int], Finished]:
        """Run to the end; returns (token ids, Finished)."""
        toks, fin = [], None
        for ev in self.generate(prompt, sampling, **kw):
            if isinstance(ev, Token) and ev.id >= 0:
                toks.append(ev.id)
            elif isinstance(ev, Finished):
                fin = ev
        return toks, fin
