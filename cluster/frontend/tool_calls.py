"""Tool calls for one chat request: what `tool_choice` means for the prompt, the grammar and
the reply.

- `none`: the tools are shown to the model; its text stays text.
- `auto` (the default with tools): the server's tool-call parser (Hermes `<tool_call>` blocks
  by default) finds calls in the text; what is not a call stays content.
- `required` and a named function are enforced with the grammar engine, as vLLM does: a named
  function's reply *is* its arguments (JSON following the function's schema); `required`
  replies with a JSON list of `{"name", "parameters"}` objects, one of the tools each. So
  arguments always parse and follow the schema.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from zayaserve.cluster.frontend.frontend_errors import InvalidRequestError
from zayaserve.cluster.frontend.tool_parsers import ParsedToolCall, get_tool_parser
from zayaserve.cluster.frontend.tool_protocol import (
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    ToolFields,
)
from zayaserve.replicas.engine.structured import StructuredOutputsParams

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


@dataclass
class ToolPlan:
    mode: str = "none"  # none | auto | required | named
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> parameters
    named: str | None = None
    parallel: bool = True
    parser: str | None = None
    template_tools: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, body: ToolFields, parser: str | None) -> ToolPlan:
        tools = body.tools or []
        choice = body.tool_choice
        if choice is not None and choice != "none" and not tools:
            raise InvalidRequestError("tool_choice: needs tools", "tool_choice")
        if len({t.function.name for t in tools}) != len(tools):
            raise InvalidRequestError("tools: function names must be unique", "tools")
        schemas = {t.function.name: t.function.parameters or _ANY_OBJECT for t in tools}
        plan = cls(schemas=schemas, parallel=body.parallel_tool_calls is not False,
                   template_tools=[t.template_dict() for t in tools] or None)
        if not tools or choice == "none":
            return plan
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in schemas:
                raise InvalidRequestError(
                    f"tool_choice.function.name: no tool is named {choice.function.name!r}",
                    "tool_choice.function.name")
            plan.mode, plan.named = "named", choice.function.name
        elif choice == "required":
            plan.mode = "required"
        else:
            if parser is None:
                raise InvalidRequestError(
                    "tool_choice: auto needs a server run with tool_call_parser; use "
                    "required, a named function or none", "tool_choice")
            plan.mode, plan.parser = "auto", parser
        return plan

    @property
    def constrains(self) -> bool:
        return self.mode in ("required", "named")

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar that enforces `required` or a named function (compact JSON)."""
        if self.mode == "named":
            assert self.named is not None
            return StructuredOutputsParams(json=self.schemas[self.named],  # type: ignore[arg-type]
                                           disable_any_whitespace=True)
        if self.mode != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"const": name},
                                                   "parameters": schema},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, schema in self.schemas.items()]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredOutputsParams(json=array,  # type: ignore[arg-type]
                                       disable_any_whitespace=True)

    def message(self, text: str, finished: bool) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a whole reply. A reply cut short (not `finished`: max
        tokens) that does not parse stays content."""
        if self.mode == "named":
            assert self.named is not None
            if not finished or not _is_object(text):
                return text, []
            return None, [ToolCall(id=_call_id(),
                                   function=FunctionCall(name=self.named, arguments=text))]
        if self.mode == "required":
            calls = _required_calls(text)
            return (None, calls) if calls else (text, [])
        if self.mode == "auto":
            content, parsed = get_tool_parser(self.parser or "").parse(text)
            if not self.parallel:
                parsed = parsed[:1]
            return content, [_tool_call(c) for c in parsed]
        return text, []

    def stream(self) -> ToolStream:
        return ToolStream(self)


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _required_calls(text: str) -> list[ToolCall]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
        return []
    return [ToolCall(id=_call_id(), function=FunctionCall(
        name=i["name"], arguments=json.dumps(i.get("parameters", {}), ensure_ascii=False)))
        for i in items]


class ToolStream:
    """One choice's reply, delta by delta: `feed` returns (content, tool-call deltas)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.called = False
        self._text: list[str] = []
        self._auto = get_tool_parser(plan.parser or "").stream() if plan.mode == "auto" else None
        self._named_id: str | None = None

    def feed(self, text: str, final: bool) -> tuple[str | None, list[DeltaToolCall]]:
        mode = self.plan.mode
        if mode == "named":
            return None, self._named(text)
        if mode == "required":  # sent whole at the end: a partial list cannot be split safely
            self._text.append(text)
            if not final:
                return None, []
            calls = _required_calls("".join(self._text))
            if not calls:
                return "".join(self._text), []
            self.called = True
            return None, [DeltaToolCall(
                index=i, id=c.id, type="function",
                function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
                for i, c in enumerate(calls)]
        if self._auto is not None:
            content, deltas = self._auto.feed(text, final)
            if not self.plan.parallel:
                deltas = [d for d in deltas if d.index == 0]
            self.called = self.called or bool(deltas)
            return content or None, [DeltaToolCall(
                index=d.index, id=d.id, type="function" if d.id else None,
                function=DeltaFunctionCall(name=d.name, arguments=d.arguments))
                for d in deltas]
        return text, []

    def _named(self, text: str) -> list[DeltaToolCall]:
        if self._named_id is None:
            self._named_id, self.called = _call_id(), True
            return [DeltaToolCall(index=0, id=self._named_id, type="function",
                                  function=DeltaFunctionCall(name=self.plan.named,
                                                             arguments=text))]
        return [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))] if text else []
