"""Chat templates: the built-in Gemma template never formats another family's turns."""

import pytest
from types import SimpleNamespace
from tandem.chat import template_for
from tandem.errors import RequestError

def test_builtin_template_only_for_gemma():
    g = template_for(SimpleNamespace(chat_template=None, config={"model_type": "gemma3_text"}), None)
    assert g.builtin and "<start_of_turn>" in g.render([{"role": "user", "content": "hi"}])
    other = template_for(SimpleNamespace(chat_template=None, config={"model_type": "llama"}), None)
    with pytest.raises(RequestError, match="llama model has no chat template"):
        other.render([{"role": "user", "content": "hi"}])
