"""Command line: one verb per tool (generate, serve, bench, train-assistant, train-nextn, train-draft-model,
train-eagle3, export-assistant)."""

from __future__ import annotations

import argparse
import os
import sys

from tandem.bench import add_bench_args, cmd_bench
from tandem.engine.options import EngineOptions, add_engine_args
from tandem.errors import TandemError
from tandem.server.serve import add_serve_args, serve
from tandem.train import (add_export_args, add_train_args, cmd_export, cmd_train, register_train_draft_model,
                          register_train_eagle3, register_train_nextn)


def cmd_generate(a) -> int:
    import time

    from tandem.config import SamplingParams
    from tandem.engine import Finished, Token
    from tandem.engine.factory import build_engine

    if a.trace:
        os.environ["TANDEM_TRACE"] = a.trace
    t0 = time.perf_counter()
    eng = build_engine(EngineOptions.from_args(a))
    load_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p, seed=a.seed,
                        max_tokens=a.max_tokens, stop=tuple(a.stop or ()), ignore_eos=a.ignore_eos)
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    chat = a.chat or (not a.raw and bool(eng.loaded.chat_template))  # an instruct model: its own template
    if chat:
        from tandem.chat import ChatEncoder, template_for
        prompt = ChatEncoder(template_for(eng.loaded, eng.tokenizer), eng.tokenizer).encode(
            [{"role": "user", "content": prompt}])
    fin, t1, first_s = None, time.perf_counter(), None
    for ev in eng.generate(prompt, sp):
        if isinstance(ev, Token):
            first_s = first_s if first_s is not None else time.perf_counter() - t1
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif isinstance(ev, Finished):
            fin = ev
    sys.stdout.write("\n")
    st = fin.stats
    ttft = f"{1000 * first_s:.0f} ms" if first_s is not None else "none"
    print(f"[{fin.reason}] {st.timing_line()} | load {load_s:.1f} s, first token {ttft} "
          f"({'chat template' if chat else 'raw prompt'})", file=sys.stderr)
    spec_line = f" | {st.spec.line()}" if st.spec is not None else ""
    print(f"drafter: {eng.describe_drafter()}{spec_line}", file=sys.stderr)
    exact, why = eng.exact
    print(f"exact: {'yes' if exact else 'no (distribution only)'}: {why}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="stream a completion")
    add_engine_args(g)
    g.add_argument("--prompt", "-p", default=None, help="prompt text (default: stdin)")
    fmt = g.add_mutually_exclusive_group()
    fmt.add_argument("--raw", action="store_true",
                     help="plain completion of the prompt (default: a model whose file carries a chat template gets "
                          "the prompt as a user message through it)")
    fmt.add_argument("--chat", action="store_true",
                     help="use the chat template even when the model file has none (Gemma's built-in one)")
    g.add_argument("--max-tokens", "-n", type=int, default=128)
    g.add_argument("--temperature", "--temp", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--trace", default=None, help="write NDJSON draft/verify events to this file")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="speed (and speculation) benchmark")
    add_engine_args(b)
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="OpenAI-compatible server")
    add_engine_args(s)
    add_serve_args(s)
    s.set_defaults(func=serve)

    t = sub.add_parser("train-assistant", help="train an MTP assistant drafter for a target")
    add_train_args(t)
    t.set_defaults(func=cmd_train)
    register_train_nextn(sub)
    register_train_draft_model(sub)
    register_train_eagle3(sub)
    x = sub.add_parser("export-assistant", help="export a drafter for transformers")
    add_export_args(x)
    x.set_defaults(func=cmd_export)

    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # what a report records as the command
    try:
        return a.func(a) or 0
    except TandemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # python -m tandem.cli, as python -m tandem
    raise SystemExit(main())
