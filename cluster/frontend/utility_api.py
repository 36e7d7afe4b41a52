"""vLLM's utility endpoints: POST /tokenize (a prompt, or chat messages rendered with the chat
template, to token ids), POST /detokenize (ids to text) and GET /version."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from zayaserve import __version__
from zayaserve.cluster.frontend.chat_options import message_dict
from zayaserve.cluster.frontend.frontend_errors import InvalidRequestError, as_frontend_error
from zayaserve.cluster.frontend.logprob_format import token_text
from zayaserve.cluster.frontend.openai_chat_protocol import ChatMessageParam
from zayaserve.cluster.frontend.openai_protocol import TokenId, _Request
from zayaserve.cluster.frontend.openapi_schema import openapi_request_body, openapi_responses
from zayaserve.cluster.frontend.request_checks import check_token_ids, served_model
from zayaserve.cluster.frontend.serving_context import ServingContext
from zayaserve.cluster.frontend.tool_protocol import ChatTool


class TokenizeRequest(_Request):
    model: str | None = Field(default=None, description="A served model id.")
    prompt: str | None = Field(default=None, description="Text to tokenize (or messages).")
    messages: list[ChatMessageParam] | None = Field(
        default=None, description="A conversation, rendered with the chat template first.")
    add_special_tokens: bool = Field(
        default=True, description="For a prompt: add the tokenizer's special tokens (bos).")
    add_generation_prompt: bool = Field(
        default=True, description="For messages: end with the assistant turn's opening.")
    tools: list[ChatTool] | None = Field(
        default=None, min_length=1, description="For messages: tools the template shows.")
    return_token_strs: bool = Field(default=False, description="Also return each token's text.")


class TokenizeResponse(BaseModel):
    count: int = Field(description="Number of tokens.")
    max_model_len: int = Field(description="The served context length.")
    tokens: list[int] = Field(description="Token ids.")
    token_strs: list[str] | None = Field(default=None, description="Each token's text.")


class DetokenizeRequest(_Request):
    model: str | None = Field(default=None, description="A served model id.")
    tokens: list[TokenId] = Field(description="Token ids to turn into text.")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="The text of the token ids.")


class VersionResponse(BaseModel):
    version: str = Field(description="zayaserve's version.")


ReadBody = Callable[[Request, type[Any]], Awaitable[Any]]


def add_utility_routes(app: FastAPI, ctx: ServingContext, authorize: Callable[[Request], Any],
                       read_body: ReadBody) -> None:

    @app.post("/tokenize", openapi_extra=openapi_request_body(TokenizeRequest),
              responses=openapi_responses(TokenizeResponse, errors=(400, 401, 404, 413, 500)))
    async def tokenize(request: Request) -> JSONResponse:
        authorize(request)
        tokenizer = ctx.client.tokenizer
        body: TokenizeRequest = await read_body(request, TokenizeRequest)
        served_model(body.model, ctx.served_model_names)
        if (body.prompt is None) == (body.messages is None):
            raise as_frontend_error(ValueError("prompt: give exactly one of prompt or messages"),
                                    default_param="prompt")
        def tokenize_body() -> JSONResponse:  # up to a megabyte of text: in a thread
            try:
                if body.messages is not None:
                    conversation = [message_dict(m, i) for i, m in enumerate(body.messages)]
                    tools = [t.template_dict() for t in body.tools or []] or None
                    _, ids = tokenizer.render_chat(conversation, body.add_generation_prompt,
                                                   tools)
                else:
                    ids = tokenizer.encode(body.prompt or "", body.add_special_tokens)
            except ValueError as err:
                raise as_frontend_error(err, default_param="messages") from None
            limit = ctx.client.max_model_len
            if len(ids) > limit:  # what no request could use is not worth an answer
                field = "messages" if body.messages is not None else "prompt"
                raise InvalidRequestError(f"{field}: {len(ids)} tokens, more than the context "
                                          f"length ({limit})", field)
            strs = [token_text(tokenizer, t) for t in ids] if body.return_token_strs else None
            return JSONResponse(TokenizeResponse(
                count=len(ids), max_model_len=limit, tokens=ids, token_strs=strs).model_dump())
        return await asyncio.to_thread(tokenize_body)

    @app.post("/detokenize", openapi_extra=openapi_request_body(DetokenizeRequest),
              responses=openapi_responses(DetokenizeResponse, errors=(400, 401, 404, 413, 500)))
    async def detokenize(request: Request) -> JSONResponse:
        authorize(request)
        body: DetokenizeRequest = await read_body(request, DetokenizeRequest)
        served_model(body.model, ctx.served_model_names)
        check_token_ids(ctx.client, list(body.tokens), "tokens")
        text = ctx.client.tokenizer.decode(list(body.tokens), skip_special_tokens=False)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    @app.get("/version", responses=openapi_responses(VersionResponse, errors=(500,)))
    async def version() -> JSONResponse:
        return JSONResponse(VersionResponse(version=__version__).model_dump())
