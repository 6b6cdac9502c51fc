"""Command line: one verb per tool (generate, serve, bench, train-assistant, export-assistant)."""

from __future__ import annotations

import argparse
import os
import sys

from tandem.errors import TandemError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="GGUF file or HF directory (default: embedded gemma-3-270m)")
    p.add_argument("--drafter", default=None, help="drafter directory/file (default: the known drafter, if any)")
    p.add_argument("--no-spec", action="store_true", help="plain decoding, no drafter")
    p.add_argument("--spec-n-max", type=int, default=3, help="max draft tokens per round")
    p.add_argument("--spec-n-min", type=int, default=1, help="discard drafts shorter than this")
    p.add_argument("--spec-p-min", type=float, default=0.0, help="stop drafting when top-1 prob < p_min")
    p.add_argument("--weight-format", default="q8_0", help="q8_0 (default: GGUF Q8_0 blocks), bf16, fp32 (exact reference)")
    p.add_argument("--cache-type-k", "-ctk", default="bf16",
                   help="KV cache type for K: bf16, f16, f32, q8_0 (int8), turbo4, turbo3, turbo2 (rotated 4/3/2-bit)")
    p.add_argument("--cache-type-v", "-ctv", default=None, help="KV cache type for V (default: same as K)")
    p.add_argument("--ctx-size", "-c", type=int, default=4096, help="context length (tokens)")
    p.add_argument("--threads", "-t", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")


def _spec_from(a):
    from tandem.config import SpecConfig
    return SpecConfig(enabled=not a.no_spec, n_max=a.spec_n_max, n_min=a.spec_n_min, p_min=a.spec_p_min)


def _engine_from(a, n_slots: int = 1):
    from tandem.engine.factory import load_engine
    spec = _spec_from(a)
    eng = load_engine(a.model, a.drafter, device=a.device, weight_format=a.weight_format,
                      cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v or a.cache_type_k,
                      max_len=a.ctx_size, n_slots=n_slots, threads=a.threads, spec=spec, use_spec=not a.no_spec)
    if eng.drafter is None:
        eng.spec = spec.__class__(**{**spec.__dict__, "enabled": False})
    return eng


def cmd_generate(a) -> int:
    from tandem.config import SamplingParams
    from tandem.engine import Finished, Token

    if a.trace:
        os.environ["TANDEM_TRACE"] = a.trace
    eng = _engine_from(a)
    sp = SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p, seed=a.seed,
                        max_tokens=a.max_tokens, stop=tuple(a.stop or ()), ignore_eos=a.ignore_eos)
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    if a.chat:
        from tandem.chat import template_for
        prompt = template_for(eng.loaded, eng.tokenizer).render([{"role": "user", "content": prompt}])
    fin = None
    for ev in eng.generate(prompt, sp, add_special_tokens=not a.chat):
        if isinstance(ev, Token):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif isinstance(ev, Finished):
            fin = ev
    sys.stdout.write("\n")
    st = fin.stats
    print(f"[{fin.reason}] {st.timing_line()}", file=sys.stderr)
    if st.spec is not None:
        print(st.spec.line(), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="stream a completion")
    _add_model_args(g)
    g.add_argument("--prompt", "-p", default=None, help="prompt text (default: stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
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
    _add_model_args(b)
    from tandem.bench import add_bench_args, cmd_bench
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)

    try:
        from tandem.server import add_serve_args, serve
        s = sub.add_parser("serve", help="OpenAI-compatible server")
        add_serve_args(s)
        s.set_defaults(func=serve)
    except ImportError:
        pass
    try:
        from tandem.train import add_train_args, add_export_args, cmd_export, cmd_train
        t = sub.add_parser("train-assistant", help="train an MTP assistant drafter for a target")
        add_train_args(t)
        t.set_defaults(func=cmd_train)
        x = sub.add_parser("export-assistant", help="export a drafter for transformers")
        add_export_args(x)
        x.set_defaults(func=cmd_export)
    except ImportError:
        pass

    a = ap.parse_args(argv)
    try:
        return a.func(a) or 0
    except TandemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
