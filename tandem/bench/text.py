"""Fixed English text for prefill/decode timing (deterministic, no downloads)."""

PARAGRAPH = (
    "The history of computing is a story of layers. At the bottom are transistors, switching on and off billions "
    "of times per second; above them sit logic gates, then arithmetic units, caches and cores. Each layer hides the "
    "details of the one beneath it, so that a programmer writing a sorting routine need not think about electrons. "
    "Compilers translate readable source code into machine instructions, operating systems share the processor "
    "among many programs, and networks connect machines across the planet. Language models are a recent layer: "
    "they predict the next word of a text from the words before it, one token at a time, and most of their cost "
    "is reading their own weights from memory for every token they produce. "
)


def text_of_tokens(tokenizer, n: int) -> list[int]:
    """Token ids of exactly n tokens of the fixed text (BOS first when the tokenizer adds one)."""
    ids = tokenizer.encode(PARAGRAPH * (1 + n // 80))
    while len(ids) < n:
        ids += tokenizer.encode(PARAGRAPH, add_special_tokens=False)
    return ids[:n]
