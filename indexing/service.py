"""The HTTP service over the published snapshot (FastAPI; `lookalike serve` runs it with uvicorn).

    GET  /similar/{item_id}?k=10   neighbours of a catalog item (itself excluded)
    POST /similar                  {"item_ids": [...]} or {"vectors": [[...]]}, "k": 10
    GET  /snapshot                 what is being served
    GET  /healthz                  liveness, with the snapshot id

Every answer, errors included, names the snapshot it came from. Unknown item →
404; bad k, bad vectors or a malformed body → 422. The client refreshes in the
background, so a newly published snapshot is served without a restart.
"""

from __future__ import annotations

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from indexing.client import SnapshotClient, UnknownItem

__all__ = ["create_app"]

MAX_K = 1000
MAX_QUERIES = 256


class NeighborOut(BaseModel):
    item_id: str
    score: float


class SimilarOut(BaseModel):
    snapshot_id: str
    item_id: str
    neighbors: list[NeighborOut]


class BatchIn(BaseModel):
    item_ids: list[str] | None = Field(default=None, min_length=1, max_length=MAX_QUERIES)
    vectors: list[list[float]] | None = Field(default=None, min_length=1, max_length=MAX_QUERIES)
    k: int = Field(default=10, ge=1, le=MAX_K)

    @model_validator(mode="after")
    def _exactly_one(self) -> BatchIn:
        if (self.item_ids is None) == (self.vectors is None):
            raise ValueError("give exactly one of item_ids or vectors")
        return self


class BatchOut(BaseModel):
    snapshot_id: str
    results: list[list[NeighborOut]]


def create_app(client: SnapshotClient) -> FastAPI:
    """An app answering from `client`'s current snapshot."""
    app = FastAPI(title="lookalike", summary="Visually similar catalog items", version="1")

    def error(status: int, detail) -> JSONResponse:
        return JSONResponse(status_code=status, content={"detail": detail, "snapshot_id": client.snapshot_id})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return error(422, [{"loc": e.get("loc"), "msg": e.get("msg")} for e in err.errors()])

    @app.exception_handler(UnknownItem)
    async def _unknown(_: Request, err: UnknownItem) -> JSONResponse:
        return error(404, str(err))

    @app.exception_handler(ValueError)
    async def _bad_value(_: Request, err: ValueError) -> JSONResponse:
        return error(422, str(err))

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "snapshot_id": client.snapshot_id}

    @app.get("/snapshot")
    def snapshot() -> dict:
        m = client.manifest
        keys = ("snapshot_id", "created_at", "model_version", "dim", "count", "metric", "index", "quality", "reduce")
        return {k: m.get(k) for k in keys}

    @app.get("/similar/{item_id}", response_model=SimilarOut)
    def similar(item_id: str, k: int = Query(default=10, ge=1, le=MAX_K)) -> SimilarOut:
        snapshot_id, found = client.search_tagged(item_ids=[item_id], k=k)
        return SimilarOut(snapshot_id=snapshot_id, item_id=item_id,
                          neighbors=[NeighborOut(item_id=n.item_id, score=n.score) for n in found[0]])  # fmt: skip

    @app.post("/similar", response_model=BatchOut)
    def similar_batch(body: BatchIn) -> BatchOut:
        snapshot_id, found = client.search_tagged(item_ids=body.item_ids, vectors=body.vectors, k=body.k)
        return BatchOut(
            snapshot_id=snapshot_id,
            results=[[NeighborOut(item_id=n.item_id, score=n.score) for n in row] for row in found],
        )

    return app
