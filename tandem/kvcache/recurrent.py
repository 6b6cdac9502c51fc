"""Recurrent state of Gated DeltaNet layers (Qwen3-Next / Qwen3.5): the causal-conv window and the delta-rule
state per slot, with rollback to any row of the slot's last forward by snapshot + replay.

Unlike K/V, a recurrent state cannot be rolled back by lowering a length: row j's state overwrites row j-1's. So
each forward keeps, per slot and layer, the state from before the forward (the snapshot: the copy the forward read
anyway, so keeping it costs no extra copy) and the per-row inputs of the update (conv input, k, v, g, beta). Rolling
back to row a replays a+1 delta-rule steps from the snapshot with the same arithmetic the forward's recurrent form
used. Keeping every row's state instead would hold T full states per layer (T = k+1 up to 17), e.g. 17 x 2 MiB x 24
layers = 816 MiB per slot for a 9B model; the snapshot + replay holds one state plus a few KiB per row.

Rows with position -1 are padding: they never advance any state (the model zeroes their g, beta, k and the conv
window skips them); they must follow a slot's valid rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# forwards longer than this (long prefill chunks) keep no replay rows: rollback into them is refused
REPLAY_MAX_ROWS = 64


def delta_rule_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    beta: torch.Tensor) -> torch.Tensor:
    """One gated delta-rule update: S <- S*exp(g); S <- S + k (beta (v - S^T k))^T.

    state [B, H, Dk, Dv] fp32, k [B, H, Dk], v [B, H, Dv], g and beta [B, H] -> new state [B, H, Dk, Dv]."""
    state = state * g.exp()[..., None, None]
    delta = (v - (state * k[..., None]).sum(-2)) * beta[..., None]
    return state + k[..., None] * delta[..., None, :]


def expand_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., Hk, D] -> [..., H, D]: each k head serves H/Hk consecutive value heads (as the reference does)."""
    return x if x.shape[-2] == n_heads else x.repeat_interleave(n_heads // x.shape[-2], dim=-2)


@dataclass
class LayerSpec:
    conv_dim: int  # channels of the causal conv (q, k and v concatenated)
    conv_width: int  # kernel size K; the state keeps the last K-1 inputs
    n_heads: int  # value heads H
    k_dim: int
    v_dim: int


@dataclass
class _Saved:
    """What one layer's last forward keeps for one slot: the state before it and its valid rows' inputs."""

    conv: torch.Tensor  # [C, K-1]
    state: torch.Tensor  # [H, Dk, Dv]
    conv_in: torch.Tensor | None  # [n, C]; None when the forward was too long to keep
    k: torch.Tensor | None  # [n, Hk, Dk] (l2-normalised, padding zeroed)
    v: torch.Tensor | None  # [n, H, Dv]
    g: torch.Tensor | None  # [n, H]
    beta: torch.Tensor | None  # [n, H]


class RecurrentState:
    """Conv windows [S, C, K-1] and delta-rule states [S, H, Dk, Dv] (fp32) of the layers in `specs`.

    `seen[slot]` counts the tokens folded into the slot's state. A forward starting at position 0 starts the slot
    afresh; any other forward must start at `seen[slot]`. `restore(slot, n)` returns to the state after n tokens:
    n == seen (nothing to do), n == 0 (empty), or n inside the last forward (replay)."""

    def __init__(self, specs: dict[int, LayerSpec], n_slots: int, device="cpu"):
        self.specs, self.n_slots, self.device = dict(specs), n_slots, torch.device(device)
        self.conv = {i: torch.zeros(n_slots, s.conv_dim, s.conv_width - 1, device=self.device)
                     for i, s in self.specs.items()}
        self.state = {i: torch.zeros(n_slots, s.n_heads, s.k_dim, s.v_dim, device=self.device)
                      for i, s in self.specs.items()}
        self.seen = [0] * n_slots
        self._start: list[int | None] = [None] * n_slots  # seen before the slot's last forward
        self._saved: list[dict[int, _Saved]] = [{} for _ in range(n_slots)]

    @property
    def bytes_per_slot(self) -> int:
        return sum((self.conv[i][0].numel() + self.state[i][0].numel()) * 4 for i in self.specs)

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_slot * self.n_slots

    def begin(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Check and record a forward over rows `positions` [B, T] of `slots` [B]; returns valid rows [B]."""
        valid = positions >= 0
        n_valid = valid.sum(1)
        for b, (slot, n) in enumerate(zip(slots.tolist(), n_valid.tolist())):
            if n == 0:
                continue
            pos = positions[b, :n]
            if not bool(valid[b, :n].all()) or not torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + n,
                                                                                 device=pos.device)):
                raise ValueError(f"slot {slot}: recurrent layers need consecutive positions followed by padding "
                                 f"(-1), got {positions[b].tolist()}")
            p0 = int(pos[0])
            if p0 == 0:
                self.reset(slot)
            elif p0 != self.seen[slot]:
                raise ValueError(f"slot {slot}: the recurrent state holds {self.seen[slot]} tokens, a forward "
                                 f"cannot start at position {p0}")
            self._start[slot], self._saved[slot] = self.seen[slot], {}
            self.seen[slot] += n
        return n_valid

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of (conv window [B, C, K-1], delta state [B, H, Dk, Dv]) of `slots` for `layer`."""
        return self.conv[layer][slots], self.state[layer][slots]

    def write(self, layer: int, slots: torch.Tensor, n_valid: torch.Tensor, conv_old: torch.Tensor,
              state_old: torch.Tensor, conv_in: torch.Tensor, state_new: torch.Tensor,
              rows: tuple[torch.Tensor, ...]) -> None:
        """Store the states after a forward and keep what rollback needs.

        conv_old [B, C, K-1] / state_old [B, H, Dk, Dv]: what `read` gave; conv_in [B, T, C]: the conv inputs;
        state_new: the state after each slot's last valid row; rows: (k [B,T,Hk,Dk], v, g, beta) per row."""
        B, T, _ = conv_in.shape
        width = conv_old.shape[-1]
        full = torch.cat([conv_old, conv_in.transpose(1, 2).to(conv_old.dtype)], dim=-1)  # [B, C, K-1+T]
        idx = n_valid[:, None, None] + torch.arange(width, device=full.device)  # the last K-1 valid inputs
        self.conv[layer][slots] = full.gather(-1, idx.expand(B, full.shape[1], width))
        self.state[layer][slots] = state_new
        keep = T <= REPLAY_MAX_ROWS
        for b, (slot, n) in enumerate(zip(slots.tolist(), n_valid.tolist())):
            if n == 0:
                continue
            per_row = [x[b, :n] for x in (conv_in, *rows)] if keep else [None] * 5
            self._saved[slot][layer] = _Saved(conv_old[b], state_old[b], *per_row)

    def reset(self, slot: int) -> None:
        for i in self.specs:
            self.conv[i][slot].zero_()
            self.state[i][slot].zero_()
        self.seen[slot], self._start[slot], self._saved[slot] = 0, 0, {}

    def snapshot(self, slot: int) -> list[torch.Tensor]:
        """Copies of the slot's conv windows and delta states (the state after its `seen` tokens), every layer."""
        return [t[slot].clone() for i in self.specs for t in (self.conv[i], self.state[i])]

    def load_snapshot(self, slot: int, n: int, snap: list[torch.Tensor]) -> None:
        """Put back a snapshot taken after n tokens: the slot then holds exactly those n tokens."""
        it = iter(snap)
        for i in self.specs:
            self.conv[i][slot] = next(it)
            self.state[i][slot] = next(it)
        self.seen[slot], self._start[slot], self._saved[slot] = n, None, {}

    def restore(self, slot: int, n: int) -> None:
        """Return `slot` to its state after n tokens (n == seen, 0, or a row of the last forward)."""
        if n == self.seen[slot]:
            return
        if n == 0:
            self.reset(slot)
            return
        start, saved = self._start[slot], self._saved[slot]
        if n > self.seen[slot] or start is None or n < start:
            raise ValueError(f"slot {slot}: cannot return the recurrent state to {n} tokens; it holds "
                             f"{self.seen[slot]} and its last forward began at {start} (rollback reaches only "
                             "rows of the last forward)")
        r = n - start
        for layer, s in saved.items():
            if s.conv_in is None:
                raise ValueError(f"slot {slot}: rollback into a forward of more than {REPLAY_MAX_ROWS} rows "
                                 "(its rows are not kept)")
            full = torch.cat([s.conv, s.conv_in[:r].T.to(s.conv.dtype)], dim=-1)
            self.conv[layer][slot] = full[:, full.shape[-1] - s.conv.shape[-1]:]
            state = s.state[None]
            H = state.shape[1]
            for t in range(r):
                state = delta_rule_step(state, expand_heads(s.k[t], H)[None], s.v[t][None], s.g[t][None],
                                        s.beta[t][None])
            self.state[layer][slot] = state[0]
        self.seen[slot] = n
