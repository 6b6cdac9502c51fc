"""Packed weights in transparent huge pages (tandem.kernels.hugepages): placed tensors keep their values and the
kernels' results bitwise, shared (tied) weights stay one tensor, placing is idempotent, small tensors stay, the
pages the kernel backs them with are huge, and TANDEM_NO_HUGEPAGES=1 or a data limit turns it off."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from tandem.kernels import PackedEmbedding, PackedLinear, prepare
from tandem.kernels import hugepages
from tandem.kernels.hugepages import Arena, arena, to_huge_pages

needs_thp = pytest.mark.skipif(arena().libc is None, reason="no transparent huge pages here (or turned off)")


def _huge_kb(addr: int) -> int:
    """AnonHugePages (kB) of the mapping holding addr (/proc/self/smaps)."""
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                cur = lo <= addr < hi
            elif cur and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


class Tied(nn.Module):
    def __init__(self, v: int = 512, d: int = 1024):
        super().__init__()
        self.embed = nn.Embedding(v, d)
        self.small = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(d, v, bias=False)
        self.head.weight = self.embed.weight


@needs_thp
@pytest.mark.parametrize("fmt", ["q8_0x8", "bf16", "fp32"])
def test_placed_weights_compute_the_same(fmt):
    torch.manual_seed(0)
    x = torch.randn(3, 1024)
    lin = nn.Linear(1024, 4096, bias=False).requires_grad_(False)  # a parameter being trained is not moved
    ref = PackedLinear.from_linear(lin, fmt)
    want = ref(x)
    tensors = {k: v.clone() for k, v in ref.state_dict().items()}
    placed = to_huge_pages(ref)
    assert placed is ref and all(arena().holds(t) for t in ref.state_dict().values())
    assert all(torch.equal(tensors[k], v) for k, v in ref.state_dict().items())
    assert torch.equal(ref(x), want)
    big = max(ref.state_dict().values(), key=lambda t: t.numel() * t.element_size())
    assert big.numel() * big.element_size() < 4 << 20 or _huge_kb(big.data_ptr()) > 0


@needs_thp
def test_tied_weights_stay_shared_and_small_ones_stay_put():
    m = prepare(Tied(), "q8_0x8")
    assert isinstance(m.embed, PackedEmbedding) and m.embed.linear is m.head
    big = [t for t in m.head.buffers() if t.numel() * t.element_size() >= hugepages.MIN_BYTES]
    assert big and all(arena().holds(t) for t in big)
    assert not any(arena().holds(t) for t in m.small.buffers())  # 32x32: below MIN_BYTES
    ptrs = [t.data_ptr() for t in m.head.buffers()]
    to_huge_pages(m)  # idempotent: nothing moves again
    assert [t.data_ptr() for t in m.head.buffers()] == ptrs
    rows = torch.tensor([0, 7, 511])
    assert torch.equal(m.embed(rows), m.head.rows(rows))


def test_turned_off_or_small_or_elsewhere(monkeypatch):
    monkeypatch.setenv("TANDEM_NO_HUGEPAGES", "1")
    off = Arena()
    t = torch.randn(1 << 16)
    assert off.libc is None and off.place(t) is t
    monkeypatch.delenv("TANDEM_NO_HUGEPAGES")
    a = Arena()
    small = torch.randn(16)
    assert a.place(small) is small and a.place(t.requires_grad_()) is t
    if a.libc is not None:  # a placed tensor is a copy in the arena, placed once
        u = torch.randn(1 << 16)
        p = a.place(u)
        assert p is not u and torch.equal(p, u) and a.holds(p) and a.place(p) is p
        assert hugepages.REGION >= p.numel() * 4


def test_off_under_a_data_limit():
    """Under ulimit -d the copies would count twice against the limit while the heap keeps freed transients: off."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_DATA, (8 << 30, 8 << 30)); "
            "from tandem.kernels.hugepages import Arena; print(Arena().libc is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
