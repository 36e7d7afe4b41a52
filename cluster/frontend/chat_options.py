"""vLLM's chat request options: `chat_template_kwargs` (scalar template variables, e.g.
`enable_thinking`), `continue_final_message` (continue the last assistant message instead of
opening a new turn), and the message dicts handed to the chat template (declared fields only:
unknown request fields are ignored, so they never reach the template)."""

from __future__ import annotations

import json
from typing import Any

from zayaserve.cluster.frontend.frontend_errors import InvalidRequestError
from zayaserve.cluster.frontend.openai_chat_protocol import ChatCompletionRequest, ChatMessageParam
from zayaserve.replicas.model.chat_template import check_template_kwargs
from zayaserve.replicas.model.tokenizer import Tokenizer
from zayaserve.replicas.validation_errors import ParamError


def check_chat_options(body: ChatCompletionRequest) -> None:
    """The checks every chat path makes before rendering (plain chat and RSA alike): option
    combinations, `chat_template_kwargs` names (not a reserved variable, a Jinja built-in or
    `self`) and `metadata` bounds."""
    if body.continue_final_message and body.add_generation_prompt:
        raise InvalidRequestError(
            "continue_final_message: needs add_generation_prompt=false", "continue_final_message")
    if body.continue_final_message and body.messages[-1].role != "assistant":
        raise InvalidRequestError(
            "continue_final_message: the last message must be the assistant's",
            "continue_final_message")
    try:
        check_template_kwargs(body.chat_template_kwargs or {})
    except ParamError as err:
        raise InvalidRequestError(str(err), err.param) from None
    if body.metadata is not None and (len(body.metadata) > 16 or any(
            len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
        raise InvalidRequestError(
            "metadata: at most 16 pairs, keys up to 64 and values up to 512 characters",
            "metadata")


def message_dict(message: ChatMessageParam, index: int) -> dict[str, Any]:
    """The message as the template sees it. Earlier calls' arguments become objects, as
    templates expect (they write them with `tojson`)."""
    content: Any = message.content
    if isinstance(content, list):
        content = [{"type": part.type, "text": part.text} for part in content]
    if content is None and not (message.role == "assistant" and message.tool_calls):
        raise InvalidRequestError(
            f"messages[{index}].content: required (null only for an assistant message with "
            "tool_calls)", f"messages[{index}].content")
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments,
                                                             f"messages[{index}].tool_calls[{j}]")}}
            for j, c in enumerate(message.tool_calls)]
    return out


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where}.function.arguments: must be JSON text of an object",
                                  f"{where}.function.arguments")
    return value


def open_final_message(tokenizer: Tokenizer, text: str, ids: list[int],
                       final: dict[str, Any]) -> tuple[str, list[int]]:
    """The rendered prompt cut right after the final message's text, so generation continues
    it: whatever the template wrote after it (end of turn, ...) is dropped, in text and ids."""
    content = final["content"]
    if isinstance(content, list):
        content = "\n".join(part["text"] for part in content)
    end = text.rfind(content) + len(content) if content else -1
    if not content or end < len(content):
        raise InvalidRequestError(
            "continue_final_message: the template does not write the final message as given",
            "continue_final_message")
    suffix = text[end:]
    if not suffix:
        return text, ids
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
    if not suffix_ids or ids[-len(suffix_ids):] != suffix_ids:
        raise InvalidRequestError(
            "continue_final_message: cannot cut this template's turn ending cleanly",
            "continue_final_message")
    return text[:end], ids[:-len(suffix_ids)]
