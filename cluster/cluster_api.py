"""Operators' view of the cluster over REST: GET /v1/cluster/placement (the expert placement's
epoch, each shard slot with its state and experts, per-expert load and the balancedness it
gives). Admin routes ask for the API key whenever keys are set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from zayaserve.cluster.frontend_errors import internal_error
from zayaserve.cluster.openapi_schema import openapi_responses
from zayaserve.cluster.streams import ServingContext

ROUTE = "/v1/cluster/placement"


class ShardView(BaseModel):
    id: str = Field(description="The slot's stable id (a restarted replica takes it over).")
    state: Literal["serving", "starting", "vacant"] = Field(
        description="serving: registered; starting: claimed, loading its experts; vacant.")
    address: str | None = Field(default=None, description="Its gRPC address when serving.")
    experts: list[int] = Field(description="The experts it holds (every layer).")


class PlacementView(BaseModel):
    epoch: int = Field(description="The placement map's version: it moves on every change.")
    num_experts: int | None = Field(default=None, description="Experts per layer.")
    experts_in_workers: bool = Field(description="True: no shards, each worker holds all.")
    shards: list[ShardView]
    expert_load: list[float] | None = Field(
        default=None, description="Tokens/s per expert (all layers), time-averaged.")
    load_window_s: float | None = Field(default=None, description="The average's time constant.")
    balancedness: float | None = Field(
        default=None, description="Mean over max shard load under this placement (1: even).")


def add_cluster_routes(app: FastAPI, ctx: ServingContext,
                       authorize: Callable[[Request], Any]) -> None:

    @app.get(ROUTE, responses=openapi_responses(PlacementView, errors=(401, 500)))
    async def placement(request: Request) -> JSONResponse:
        authorize(request)
        try:
            view = PlacementView.model_validate(await ctx.client.placement())
        except Exception as err:  # the controller unreachable, or a bug: the server's
            raise internal_error(err, ROUTE) from err
        return JSONResponse(view.model_dump())
