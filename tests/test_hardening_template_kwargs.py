"""Abuse tests of `chat_template_kwargs`: a name the template needs for itself (a reserved
variable such as `messages`, a Jinja global such as `namespace`, our `raise_exception`, or
`self`) is a 400 naming `chat_template_kwargs.<name>`, never a 500, on plain chat and RSA chat
alike; RSA chat also bounds `metadata` as plain chat does. The renderer refuses such names too
(the offline API's path)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai_helpers import MODEL, Server

from zayaserve.replicas.model.chat_template import BUILTIN_NAMES, RESERVED_VARIABLES
from zayaserve.replicas.model.checkpoint_paths import resolve_model
from zayaserve.replicas.model.tokenizer import Tokenizer
from zayaserve.replicas.validation_errors import ParamError

NAMES = sorted(BUILTIN_NAMES | RESERVED_VARIABLES)
MESSAGES = [{"role": "user", "content": "hi"}]
RSA = {"n": 2, "k": 1, "t": 1, "tail_tokens": 8, "round_max_tokens": 4, "final_max_tokens": 4}


def _chat(server: Server, **fields: Any) -> httpx.Response:
    budget = {} if "rsa" in fields else {"max_tokens": 2}  # rsa has budgets of its own
    return httpx.post(server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MESSAGES, **budget, **fields})


def _assert_400(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"].startswith(param)
    assert "Traceback" not in r.text


def test_the_names_cover_jinja_globals_and_reserved_variables() -> None:
    assert {"namespace", "raise_exception", "range", "dict", "lipsum", "cycler", "joiner",
            "self"} <= BUILTIN_NAMES
    assert {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
            "documents"} <= RESERVED_VARIABLES


@pytest.mark.parametrize("rsa", [None, RSA], ids=["chat", "rsa"])
@pytest.mark.parametrize("name", NAMES)
def test_a_template_name_is_a_400_naming_it(server: Server, name: str,
                                            rsa: dict[str, Any] | None) -> None:
    extra = {"rsa": rsa} if rsa is not None else {}
    r = _chat(server, chat_template_kwargs={"enable_thinking": False, name: 1}, **extra)
    _assert_400(r, f"chat_template_kwargs.{name}")


def test_ordinary_kwargs_still_work(server: Server) -> None:
    r = _chat(server, chat_template_kwargs={"enable_thinking": False, "loop_count": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("rsa", [None, RSA], ids=["chat", "rsa"])
def test_rsa_chat_bounds_metadata_as_chat_does(server: Server,
                                               rsa: dict[str, Any] | None) -> None:
    extra = {"rsa": rsa} if rsa is not None else {}
    too_many = {f"k{i}": "v" for i in range(17)}
    _assert_400(_chat(server, metadata=too_many, **extra), "metadata")
    _assert_400(_chat(server, metadata={"k": "v" * 513}, **extra), "metadata")


@pytest.mark.parametrize("name", sorted((BUILTIN_NAMES | RESERVED_VARIABLES) - {
    "self", "messages", "add_generation_prompt", "tools"}))  # Python's own arguments
def test_the_renderer_refuses_them_too(name: str) -> None:
    tok = Tokenizer.from_pretrained(resolve_model("tiny"))
    with pytest.raises(ParamError) as caught:
        tok.render_chat(MESSAGES, **{name: 1})
    assert caught.value.param == f"chat_template_kwargs.{name}"
