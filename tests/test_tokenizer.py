"""Our tokenizer for the embedded gemma-3-270m == transformers' tokenizer built from the same GGUF; stream decoding."""

import os

import pytest

pytestmark = pytest.mark.slow

SAMPLES = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 and 1,000,000 — isn't it?",
    "Grüße aus München! Die Straße ist schön, Äpfel und Öl kosten 5€.",
    "我爱北京天安门。今天天气很好，我们去公园散步吧！",
    "日本語のテキストです。カタカナとひらがな、漢字も含みます。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "Привет, мир! Как дела? Ёжик в тумане.",
    "def fib(n):\n\tif n < 2:\n\t\treturn n\n\treturn fib(n - 1) + fib(n - 2)\n\n\nclass A:\n    def f(self):\n"
    "        pass  # comment\n",
    "for (int i = 0; i < n; ++i) {\n    x[i] = y[i] * 2;\t// tab\n}\r\n",
    "emoji 😀😂👍🏽 family 👨‍👩‍👧‍👦 rainbow 🏳️‍🌈 kiss 👩‍❤️‍💋‍👨 flag 🇩🇪 keycap 1️⃣",
    "runs of spaces:  two   three    four     five          ten\n\n\n\nfour newlines\n \n \t \n",
    "   leading and trailing   ",
    "<start_of_turn>user\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\nSure!<end_of_turn>\n",
    "<bos>text with <eos> and <pad> and <mask> inside",
    "rare: 𠀀𠀁𪚥 \U0001FAE8 \u200b\u200d zero-width, \x00 nul, \x7f del, ° ± µ ¶",
    "Mixed: Hello 世界 مرحبا мир 🌍 — done.",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok():
    from tandem.loading import load
    return load("gemma-3-270m")


@pytest.fixture(scope="module")
def ours(tok):
    return tok.tokenizer


@pytest.fixture(scope="module")
def ref(tok):
    from transformers import AutoTokenizer
    d, name = os.path.split(tok.path)
    return AutoTokenizer.from_pretrained(d, gguf_file=name)


def test_fresh_build_equals_cached(tok, ours):
    """The tokenizer rebuilt from GGUF metadata and the cached tokenizer.json agree."""
    from tandem.loading.gguf import GGUFFile
    from tandem.tokenizer import Tokenizer
    f = GGUFFile(tok.path)
    fresh = Tokenizer.from_gguf_metadata(f.tokenizer_metadata(), f.architecture)
    for s in SAMPLES:
        assert fresh.encode(s) == ours.encode(s)
    assert (fresh.bos_id, fresh.eos_ids) == (ours.bos_id, ours.eos_ids)


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_ids_match_transformers(ours, ref, i):
    s = SAMPLES[i]
    assert ours.encode(s) == ref.encode(s)
    assert ours.encode(s, add_special_tokens=False) == ref.encode(s, add_special_tokens=False)


def test_special_ids(ours, ref):
    assert ours.bos_id == ref.bos_token_id == 2
    assert ours.eos_ids[0] == ref.eos_token_id == 1
    assert ours.piece_to_id("<end_of_turn>") in ours.eos_ids
    assert ours.encode("<start_of_turn>", add_special_tokens=False) == [ours.piece_to_id("<start_of_turn>")]
    assert ours.id_to_piece(2) == "<bos>"
    assert ours.vocab_size == 262144


def test_decode_round_trip(ours, ref):
    for s in SAMPLES:
        ids = ours.encode(s, add_special_tokens=False)
        assert ours.decode(ids) == s
        assert ours.decode(ids) == ref.decode(ids)
        with_bos = ours.encode(s)
        assert ours.decode(with_bos) == ref.decode(with_bos)
        assert ours.decode(with_bos, skip_special_tokens=True) == ref.decode(with_bos, skip_special_tokens=True)


def test_byte_fallback_is_exercised(ours):
    ids = ours.encode("𠀀𪚥\U0001FAE8", add_special_tokens=False)
    assert any(ours.is_byte_piece(i) for i in ids)


@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder(ours, skip):
    for s in SAMPLES + ["".join(SAMPLES)]:
        ids = ours.encode(s)
        sd = ours.stream(skip_special_tokens=skip)
        chunks = [sd.put(i) for i in ids] + [sd.flush()]
        for c in chunks:
            c.encode("utf-8")  # no lone surrogates
            assert "\ufffd" not in c  # never a partial character
        assert "".join(chunks) == ours.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_chunked_and_invalid_bytes(ours):
    ids = ours.encode("ab 𠀀 cd 👨‍👩‍👧 ef")
    sd = ours.stream()
    out = sd.put(ids[:3]) + sd.put(ids[3:7]) + sd.put(ids[7:]) + sd.flush()
    assert out == ours.decode(ids)
    # an invalid byte run (lone continuation byte) decodes to U+FFFD, in the stream as in decode()
    bad = [ours.piece_to_id("<0x80>"), ours.piece_to_id("▁x"), ours.piece_to_id("<0xE4>")]
    sd = ours.stream()
    parts = [sd.put(i) for i in bad] + [sd.flush()]
    assert "".join(parts) == ours.decode(bad)
    assert parts[0] == ""  # held while the byte run is open
