"""The request fields of structured outputs (both endpoints): OpenAI's `response_format`,
vLLM's `structured_outputs` and its older `guided_*` fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from zayaserve.cluster.frontend.openai_protocol import _Request

# vLLM's older per-kind fields (still sent by many clients): the kind each one sets.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


class JsonSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64, description="The schema's name.")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The JSON schema the reply follows.")
    strict: bool | None = Field(default=None, description="Accepted; the schema is always "
                                "enforced.")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text: free text; json_object: any JSON object; json_schema: JSON that "
        "follows json_schema.schema.")
    json_schema: JsonSchemaFormat | None = Field(
        default=None, description="With type json_schema: the schema.")


class StructuredOutputsField(_Request):
    """vLLM's structured_outputs: set exactly one of json, regex, choice, grammar,
    json_object."""

    json_: dict[str, Any] | str | None = Field(
        default=None, alias="json", description="A JSON schema (object or JSON text).")
    regex: str | None = Field(default=None, description="A regular expression to match.")
    choice: list[str] | None = Field(default=None, description="The reply is one of these.")
    grammar: str | None = Field(default=None, description="An EBNF grammar (rule `root`).")
    json_object: bool | None = Field(default=None, description="Any JSON object.")
    disable_any_whitespace: bool | None = Field(
        default=None, description="JSON without optional whitespace.")


class StructuredFields(_Request):
    """Mixed into both endpoints' requests; at most one of these may be set."""

    response_format: ResponseFormat | None = Field(
        default=None, description="OpenAI: json_object (JSON mode) or json_schema.")
    structured_outputs: StructuredOutputsField | None = Field(
        default=None, description="vLLM: constrain the reply to a schema, regex, choice or "
        "grammar.")
    guided_json: dict[str, Any] | str | None = Field(
        default=None, description="vLLM (older): as structured_outputs.json.")
    guided_regex: str | None = Field(
        default=None, description="vLLM (older): as structured_outputs.regex.")
    guided_choice: list[str] | None = Field(
        default=None, description="vLLM (older): as structured_outputs.choice.")
    guided_grammar: str | None = Field(
        default=None, description="vLLM (older): as structured_outputs.grammar.")
