"""The HTTP service over the published snapshot (FastAPI; `lookalike serve` runs it with uvicorn).

    GET  /similar/{item_id}?k=10   neighbours of a catalog item (itself excluded)
    POST /similar                  {"item_ids": [...]} or {"vectors": [[...]]}, "k": 10
    GET  /snapshot                 what is being served
    GET  /healthz                  liveness, with the snapshot id

Every answer, errors included, names the snapshot it came from. Unknown item →
404 (in a POST's batch of item ids: null in its place, and its id in `unknown`); bad k, bad vectors or a malformed body → 422; a body over `max_body_bytes` →
413; with a token, a missing or wrong `Authorization: Bearer` → 401 (`/healthz`
stays open for liveness probes). Request input only ever selects rows of the
loaded snapshot: no path, file or URI is taken from a request. The client
refreshes in the background, so a newly published snapshot is served without a
restart.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from indexing.client import SnapshotClient, UnknownItem

__all__ = ["ServeSettings", "app_from_environment", "create_app"]

MAX_K = 1000
MAX_QUERIES = 256
# 256 query vectors of 1,152 floats (so400m) as JSON are about 6 MB.
MAX_BODY_BYTES = 8 * 1024 * 1024


class NeighborOut(BaseModel):
    item_id: str
    score: float


class SimilarOut(BaseModel):
    snapshot_id: str
    item_id: str
    neighbors: list[NeighborOut]


class ByItems(BaseModel):
    """Neighbours of catalog items."""

    model_config = ConfigDict(extra="forbid")
    item_ids: list[str] = Field(min_length=1, max_length=MAX_QUERIES)
    k: int = Field(default=10, ge=1, le=MAX_K)


class ByVectors(BaseModel):
    """Neighbours of raw vectors of the embedding model's dimension."""

    model_config = ConfigDict(extra="forbid")
    vectors: list[list[float]] = Field(min_length=1, max_length=MAX_QUERIES)
    k: int = Field(default=10, ge=1, le=MAX_K)


class BatchOut(BaseModel):
    snapshot_id: str
    # By item ids: null in the place of an item not in the snapshot (listed in `unknown`), not a 404 for the batch.
    results: list[list[NeighborOut] | None]
    unknown: list[str] = Field(default_factory=list)


class ErrorOut(BaseModel):
    detail: str | list[dict]
    snapshot_id: str


def _errors(*statuses: int) -> dict:
    meaning = {401: "missing or wrong bearer token", 404: "item not in the snapshot", 413: "request body too large",
               422: "invalid request"}  # fmt: skip
    return {status: {"model": ErrorOut, "description": meaning[status]} for status in statuses}


class _BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` (413) before the app parses them.

    Checks the declared Content-Length first, then counts what actually arrives, so a chunked
    or lying client is cut off at the limit too; at most `max_bytes` is ever buffered.
    """

    def __init__(self, app, max_bytes: int, snapshot_id) -> None:
        self.app, self.max_bytes, self.snapshot_id = app, max_bytes, snapshot_id

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        content = json.dumps({"detail": f"request body over {self.max_bytes} bytes", "snapshot_id": self.snapshot_id()})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": content.encode()})


class _Unauthorized(Exception):
    pass


@dataclass(frozen=True)
class ServeSettings:
    """What `lookalike serve` hands each of its worker processes (`--workers`), through the environment."""

    ENV: ClassVar[str] = "LOOKALIKE_SERVE"
    root: str
    refresh_s: float
    token_file: str | None  # read by each process; else `LOOKALIKE_TOKEN`, which they inherit
    max_body_bytes: int

    def token(self) -> str | None:
        return Path(self.token_file).read_text() if self.token_file else os.environ.get("LOOKALIKE_TOKEN")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def app(self, client: SnapshotClient) -> FastAPI:
        """The app over `client`, which refreshes from now on."""
        app = create_app(client, token=self.token(), max_body_bytes=self.max_body_bytes)
        client.start_auto_refresh(self.refresh_s)
        return app


def app_from_environment() -> FastAPI:
    """The app of one of `lookalike serve --workers N`'s processes (uvicorn's factory): a client of its own over the
    snapshot's mapped files, refreshing on its own, closed with the process's server."""
    settings = ServeSettings(**json.loads(os.environ[ServeSettings.ENV]))
    client = SnapshotClient(settings.root)
    app = settings.app(client)
    app.router.on_shutdown.append(client.close)
    return app


def create_app(client: SnapshotClient, *, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """An app answering from `client`'s current snapshot.

    Args:
        token: when given, every endpoint but /healthz wants `Authorization: Bearer <token>`.
        max_body_bytes: larger request bodies are refused with 413 unread.
    """
    if token is not None and not token.strip():
        raise ValueError("the bearer token is empty")
    expected = f"Bearer {token.strip()}".encode() if token else None

    def authorized(request: Request) -> None:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise _Unauthorized

    app = FastAPI(title="lookalike", summary="Visually similar catalog items", version="1")
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes, snapshot_id=lambda: client.snapshot_id)
    guarded = [Depends(authorized)]

    def error(status: int, detail, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"detail": detail, "snapshot_id": client.snapshot_id},
                            headers=headers)  # fmt: skip

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_: Request, __: _Unauthorized) -> JSONResponse:
        return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

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

    @app.get("/snapshot", dependencies=guarded, responses=_errors(401))
    def snapshot() -> dict:
        m = client.manifest
        keys = ("snapshot_id", "created_at", "model_version", "dim", "count", "metric", "index", "quality", "reduce")
        return {**{k: m.get(k) for k in keys}, "refresh": client.refresh_status}

    @app.get(
        "/similar/{item_id:path}", response_model=SimilarOut, dependencies=guarded, responses=_errors(401, 404, 422)
    )
    def similar(item_id: str, k: int = Query(default=10, ge=1, le=MAX_K)) -> SimilarOut:
        snapshot_id, found = client.search_tagged(item_ids=[item_id], k=k)
        return SimilarOut(snapshot_id=snapshot_id, item_id=item_id,
                          neighbors=[NeighborOut(item_id=n.item_id, score=n.score) for n in found[0]])  # fmt: skip

    @app.post("/similar", response_model=BatchOut, dependencies=guarded, responses=_errors(401, 413, 422))
    def similar_batch(body: ByItems | ByVectors) -> BatchOut:
        if isinstance(body, ByItems):
            snapshot_id, found = client.search_tagged(item_ids=body.item_ids, k=body.k, unknown="none")
        else:
            snapshot_id, found = client.search_tagged(vectors=body.vectors, k=body.k)
        unknown = (
            [i for i, row in zip(body.item_ids, found, strict=True) if row is None] if isinstance(body, ByItems) else []
        )
        return BatchOut(
            snapshot_id=snapshot_id,
            results=[
                None if row is None else [NeighborOut(item_id=n.item_id, score=n.score) for n in row] for row in found
            ],  # fmt: skip
            unknown=unknown,
        )

    return app
