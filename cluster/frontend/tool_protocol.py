"""OpenAI's tool-calling schema for chat: `tools` and `tool_choice` in, `tool_calls` out
(whole, or as streamed deltas), and the tool calls and results of earlier turns."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from zayaserve.cluster.frontend.openai_protocol import _Request

MAX_TOOLS = 128


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="The function's name (letters, digits, _ . -).")
    description: str | None = Field(default=None, description="What it does, for the model.")
    parameters: dict[str, Any] | None = Field(
        default=None, description="A JSON schema of its arguments (an object).")
    strict: bool | None = Field(default=None, description="Accepted; arguments follow the "
                                "schema whenever tool_choice is required or a function.")


class ChatTool(_Request):
    type: Literal["function"] = Field(description="Only functions.")
    function: FunctionDefinition

    def template_dict(self) -> dict[str, Any]:
        """The tool as the chat template sees it: declared fields only (unknown request fields
        are ignored, so they never reach the prompt)."""
        f = self.function
        function = {"name": f.name, "description": f.description, "parameters": f.parameters,
                    "strict": f.strict}
        return {"type": self.type,
                "function": {k: v for k, v in function.items() if v is not None}}


class NamedFunction(_Request):
    name: str = Field(min_length=1, description="One of the tools' names.")


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallParam(_Request):
    name: str
    arguments: str = Field(description="The arguments as JSON text (an object).")


class ToolCallParam(_Request):
    """A call the assistant made in an earlier turn."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ToolFields(_Request):
    """The chat request's tool fields."""

    tools: list[ChatTool] | None = Field(
        default=None, min_length=1, max_length=MAX_TOOLS,
        description="Functions the model may call.")
    tool_choice: ToolChoice | None = Field(
        default=None, description="none, auto (the default with tools), required (at least one "
        "call), or a named function (exactly that call).")
    parallel_tool_calls: bool | None = Field(
        default=None, description="false: at most one call per reply.")


# ---- responses ------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text of the arguments object.")


class ToolCall(BaseModel):
    id: str = Field(description="chatcmpl-tool-<hex>.")
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int = Field(description="Which call of the message this piece belongs to.")
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None
