"""Chat templates: the model's own (GGUF/HF metadata), else a built-in one for Gemma models only, rendered in a
jinja2 sandbox. A non-Gemma model without a template has none: chat requests are refused, never mis-formatted."""

from __future__ import annotations

import datetime
import re
import secrets
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tandem.errors import ModelLoadError, RequestError

# Gemma turn format: system/developer text is put in front of the first user turn; assistant turns are "model".
GEMMA_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
{%- if m['role'] in ['system', 'developer'] -%}
{%- set ns.system = ns.system + (m['content'] | trim) + '\n\n' -%}
{%- else -%}
{%- set role = 'model' if m['role'] == 'assistant' else 'user' -%}
{{- '<start_of_turn>' ~ role ~ '\n' -}}
{%- if role == 'user' and ns.system -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}
{{- m['content'] | trim -}}
{{- '<end_of_turn>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if ns.system -%}{{- '<start_of_turn>user\n' ~ ns.system | trim ~ '<end_of_turn>\n' -}}{%- endif -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""


def _raise(message: str):
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "<bos>", eos_token: str = "<eos>",
                 fallback: str | None = GEMMA_TEMPLATE, model_type: str = "gemma"):
        self.builtin = not source
        self.source = source or fallback
        self.model_type = model_type
        self.bos_token, self.eos_token = bos_token, eos_token
        if self.source is None:
            self.template = None
            return
        try:
            self.template = _compile(self.source)
        except TemplateError as e:  # another family's turn format would be silently wrong: refuse instead
            raise ModelLoadError(f"the model's chat template does not compile in the jinja2 sandbox: "
                                 f"{type(e).__name__}: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise RequestError(f"messages: this {self.model_type} model has no chat template (none in its GGUF "
                               f"metadata or tokenizer_config.json); send a plain prompt to /v1/completions")
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise RequestError(f"messages: chat template: {e}") from None
        except Exception as e:  # noqa: BLE001 - a template is user-supplied code: any failure is a bad request
            raise RequestError(f"messages: chat template failed: {type(e).__name__}: {e}") from None


def template_for(loaded, tokenizer) -> ChatTemplate:
    source = getattr(loaded, "chat_template", None) if loaded is not None else None
    bos, eos = "<bos>", "<eos>"
    if tokenizer is not None:
        piece = getattr(tokenizer, "id_to_piece", None)
        if piece is not None:
            if getattr(tokenizer, "bos_id", None) is not None:
                bos = piece(tokenizer.bos_id) or bos
            eos_ids = getattr(tokenizer, "eos_ids", None) or []
            if eos_ids:
                eos = piece(eos_ids[0]) or eos
    mtype = str((getattr(loaded, "config", None) or {}).get("model_type", "gemma"))
    return ChatTemplate(source, bos, eos, GEMMA_TEMPLATE if mtype.startswith("gemma") else None, mtype)


def special_strings(tokenizer) -> tuple[str, ...]:
    """The text of every special (control) token the tokenizer would parse out of a string, longest first."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        return ()
    found = {t.content for t in backend.get_added_tokens_decoder().values() if t.special and t.content}
    return tuple(sorted(found, key=len, reverse=True))


class ChatEncoder:
    """Messages -> prompt token ids. Special-token strings inside message content are TEXT unless the operator
    allows them: otherwise a user could write `<start_of_turn>system` and forge turns the template never made.

    Such strings are swapped for per-call sentinels before rendering; the rendered prompt is tokenized piecewise:
    template text with specials parsed, each shielded string with specials off."""

    def __init__(self, template: ChatTemplate, tokenizer, special_in_content: bool = False):
        self.template, self.tokenizer = template, tokenizer
        specials = () if special_in_content or tokenizer is None else special_strings(tokenizer)
        self._find = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._plain = None  # a copy of the backend that never matches special tokens, made on first need

    def encode(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("messages: this model has no tokenizer: send token ids to /v1/completions")
        shielded: list[str] = []
        nonce = secrets.token_hex(6)  # a user cannot guess it, so cannot forge a sentinel of their own

        def sentinel(k: int) -> str:
            return f"\ue000{nonce}:{k}\ue001"

        def shield(text):
            if self._find is None or not isinstance(text, str):
                return text
            return self._find.sub(lambda m: shielded.append(m.group()) or sentinel(len(shielded) - 1), text)
        prompt = self.template.render([{**m, "content": shield(m.get("content"))} for m in messages])
        # encode_batch: it releases the GIL (tokenizers' single encode does not), so a server's loop keeps running
        if not shielded:
            return self.tokenizer.encode_batch([prompt], add_special_tokens=False)[0]
        ids: list[int] = []
        for i, seg in enumerate(re.split(f"\ue000{nonce}:(\\d+)\ue001", prompt)):
            if i % 2 == 0:
                ids += self.tokenizer.encode_batch([seg], add_special_tokens=False)[0] if seg else []
            else:
                ids += self._plain_backend().encode_batch([shielded[int(seg)]], add_special_tokens=False)[0].ids
        return ids

    def _plain_backend(self):
        if self._plain is None:
            from tokenizers import Tokenizer

            self._plain = Tokenizer.from_str(self.tokenizer.backend.to_str())
            self._plain.encode_special_tokens = True
        return self._plain
