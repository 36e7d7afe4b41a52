"""Operating the cluster over REST: GET /v1/cluster/placement (the expert placement's epoch,
each shard slot with its state and experts, per-expert load and the balancedness it gives),
POST /v1/cluster/scale (resize either deployment in place; answers an operation) and GET
/v1/cluster/operations/{id} (its phase). Every route here is an admin route: `authorize` is
the admin check (admin_auth.py), never a tenant's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from zayaserve.cluster.frontend.frontend_errors import (
    ConflictError,
    FrontendError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    internal_error,
)
from zayaserve.cluster.frontend.openapi_schema import openapi_responses
from zayaserve.cluster.frontend.serving_context import ServingContext

ROUTE = "/v1/cluster/placement"
SCALE_ROUTE, OPERATIONS_ROUTE = "/v1/cluster/scale", "/v1/cluster/operations/{op_id}"


class ShardView(BaseModel):
    id: str = Field(description="The slot's stable id (a restarted replica takes it over).")
    state: Literal["serving", "starting", "leaving", "vacant"] = Field(
        description="serving: registered; starting: claimed, loading its experts; leaving: "
        "Serve is stopping it (routed around, draining); vacant: its replica died.")
    address: str | None = Field(default=None, description="Its gRPC address when serving.")
    experts: list[int] = Field(description="The experts the current epoch routes to it.")
    held: list[int] = Field(default_factory=list, description="The experts it has loaded.")


class PlacementView(BaseModel):
    epoch: int = Field(description="The committed placement's number: it moves when a new "
                       "assignment of experts to shards is published.")
    version: int = Field(default=0, description="The routing map's version (addresses too).")
    generation: int = Field(default=0, description="The placement controller's start count: "
                            "maps order by (generation, version), so neither goes back when "
                            "its replica restarts (its state is kept in Ray's GCS).")
    desired_shards: int = Field(default=0, description="Expert shards Serve is asked to run.")
    attention_workers: int = Field(default=1, description="Attention workers reporting.")
    desired_attention_workers: int = Field(default=1, description="Workers Serve is asked for.")
    pending: str | None = Field(default=None, description="Why a new epoch is being prepared.")
    operation: str | None = Field(default=None, description="The resize operation running.")
    rebalances: int = Field(default=0, description="EPLB rebalances started so far.")
    autoscaler: list[str] | None = Field(
        default=None, description="The autoscaler's reasons for its last decision, per pool "
        "(null: autoscaling off).")
    num_experts: int | None = Field(default=None, description="Experts per layer.")
    experts_in_workers: bool = Field(description="True: no shards, each worker holds all.")
    shards: list[ShardView]
    expert_load: list[float] | None = Field(
        default=None, description="Tokens/s per expert (all layers), time-averaged.")
    load_window_s: float | None = Field(default=None, description="The average's time constant.")
    balancedness: float | None = Field(
        default=None, description="Mean over max shard load under this placement (1: even).")
    observed_balancedness: float | None = Field(
        default=None, description="Mean over max of the rows/s the shards report.")


class ScaleRequest(BaseModel):
    expert_shards: int | None = Field(default=None, ge=0, description="Expert shards to run.")
    attention_workers: int | None = Field(default=None, ge=1,
                                          description="Attention workers to run.")


class Operation(BaseModel):
    id: str
    expert_shards: int | None
    attention_workers: int | None
    phase: Literal["preparing", "committing", "done", "failed"]
    detail: str = Field(description="What it is doing or waiting for.")
    error: str | None = None
    created: float = Field(description="Unix time it started.")
    start_epoch: int
    epoch: int = Field(description="The placement's epoch now.")
    history: list[str] = Field(description="Its steps so far.")
    reason: str = Field(default="", description="Why it started: the autoscaler's signals "
                        "(empty for a resize by hand).")


class ScaleResponse(BaseModel):
    operation: Operation
    created: bool = Field(description="False: the same resize was already running.")


def add_cluster_routes(app: FastAPI, ctx: ServingContext,
                       authorize: Callable[[Request], Any],
                       read_body: Callable[[Request, type[Any]], Awaitable[Any]]) -> None:

    @app.get(ROUTE, responses=openapi_responses(PlacementView, errors=(401, 403, 500)))
    async def placement(request: Request) -> JSONResponse:
        authorize(request)
        try:
            view = PlacementView.model_validate(await ctx.client.placement())
        except Exception as err:  # the controller unreachable, or a bug: the server's
            raise internal_error(err, ROUTE) from err
        return JSONResponse(view.model_dump())

    @app.post(SCALE_ROUTE, responses=openapi_responses(ScaleResponse,
                                                       errors=(400, 401, 403, 409, 413, 429, 500)))
    async def scale(request: Request) -> JSONResponse:
        authorize(request)
        body: ScaleRequest = await read_body(request, ScaleRequest)
        try:
            answer = await ctx.client.scale(body.expert_shards, body.attention_workers)
        except FrontendError:
            raise
        except Exception as err:
            raise internal_error(err, SCALE_ROUTE) from err
        if answer.get("error") == "conflict":
            raise ConflictError(answer["message"], answer.get("param", "expert_shards"))
        if answer.get("error") == "rate_limited":
            raise OverloadedError(answer["message"], "scale",
                                  retry_after_s=max(1, int(answer["retry_after_s"] + 0.999)))
        if answer.get("error"):
            message = str(answer["message"])
            raise InvalidRequestError(message, message.split(":")[0].split(" ")[0])
        return JSONResponse(ScaleResponse.model_validate(answer).model_dump(),
                            status_code=202 if answer["created"] else 200)

    @app.get(OPERATIONS_ROUTE, responses=openapi_responses(Operation, errors=(401, 403, 404, 500)))
    async def operation(op_id: str, request: Request) -> JSONResponse:
        authorize(request)
        try:
            op = await ctx.client.operation(op_id[:64])
        except Exception as err:
            raise internal_error(err, OPERATIONS_ROUTE) from err
        if op is None:
            raise NotFoundError(f"op_id: no operation {op_id[:64]!r} (the latest 64 are kept)",
                                "op_id")
        return JSONResponse(Operation.model_validate(op).model_dump())
