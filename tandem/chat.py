"""Chat templates: the model's own (GGUF/HF metadata), else a built-in one for Gemma models only, rendered in a
jinja2 sandbox. A non-Gemma model without a template has none: chat requests are refused, never mis-formatted."""

from __future__ import annotations

import datetime
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
