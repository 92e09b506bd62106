"""The HTTP surface: OpenAI-compatible chat completions, feedback, memory admin; auth and limits.

Every error is a JSON body in OpenAI's shape (`{"error": {"message", "type", "param"}}`),
which the `openai` client raises as a typed exception with that message. Bearer tokens
are compared in constant time and never logged; the token decides who the caller is
(`serving.identity`). The memory endpoints show and remove only the caller's own entries;
an admin sees and removes any, and alone may share an entry with every user.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException

from .identity import Authenticator, Principal, load_token
from .identity import IdentityError as TokenFileError
from .schemas import ChatRequest, DeployRequest, FeedbackRequest, ShareRequest, error_body
from .service import BadRequest, MemPromptService, NotFound, PermissionDenied, ServeSettings
from .versions import AdapterRefused, VersionConflict

__all__ = ["build_app", "load_token", "TokenFileError"]  # the last two: the names callers and tests know
log = logging.getLogger("heedful.serving")
OPEN_PATHS = {"/health"}


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over `limit` bytes, by header or while they stream in.

    The body is read here (it is small by construction) and replayed to the app, so an
    oversized chunked upload is answered 413 before any route sees it.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, error_body(f"request body is {int(length)} bytes; the limit is {self.limit}"))
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await _send_json(send, 413, error_body(f"request body is over the limit of {self.limit} bytes"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # e.g. a client disconnect during a streamed reply

        await self.app(scope, replay, send)


async def _send_json(send, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def build_app(settings: ServeSettings, service: MemPromptService | None = None) -> FastAPI:
    """The app; the service (model, memory) is created at startup unless one is given."""
    auth_by = Authenticator(users_file=settings.users_file, token_file=settings.token_file)
    state: dict = {"service": service}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state["service"] is None:
            state["service"] = await run_in_threadpool(MemPromptService, settings)
        yield
        await run_in_threadpool(state["service"].close)

    app = FastAPI(title="heedful serve (MemPrompt)", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def svc() -> MemPromptService:
        if state["service"] is None:  # hosts that skip the ASGI lifespan
            state["service"] = MemPromptService(settings)
        return state["service"]

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if request.url.path not in OPEN_PATHS:
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            principal = auth_by.authenticate(given.strip() if scheme.lower() == "bearer" else None)
            if principal is None:
                return JSONResponse(
                    error_body(
                        "missing or invalid bearer token (send 'Authorization: Bearer ...')",
                        "authentication_error",
                        code="invalid_api_key",
                    ),
                    status_code=401,
                )
            request.state.principal = principal
        return await call_next(request)

    def who(request: Request) -> Principal:
        return request.state.principal

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = _loc(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        elif first.get("type") == "extra_forbidden":
            message = f"unrecognized request argument supplied: {where}"
        elif not where and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            message = "request body must be a JSON object (with Content-Type: application/json)"
        elif first.get("type") == "missing":
            message = f"{where}: field required"
        else:
            text = str(first["msg"]).removeprefix("Value error, ")
            message = f"{where}: {text}" if where else text
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Unknown route (404), wrong method (405): OpenAI's error shape too."""
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest):
        return JSONResponse(error_body(str(exc), param=exc.param), status_code=400)

    @app.exception_handler(PermissionDenied)
    async def denied(request: Request, exc: PermissionDenied):
        return JSONResponse(error_body(str(exc), "permission_error", code="forbidden"), status_code=403)

    @app.exception_handler(AdapterRefused)
    async def refused(request: Request, exc: AdapterRefused):
        return JSONResponse(error_body(str(exc), code="adapter_refused", param="adapter"), status_code=422)

    @app.exception_handler(VersionConflict)
    async def conflict(request: Request, exc: VersionConflict):
        return JSONResponse(error_body(str(exc), code="version_conflict"), status_code=409)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return JSONResponse(error_body(str(exc), code="not_found"), status_code=404)

    @app.get("/health")
    def health():
        return {"status": "ok" if state["service"] is not None else "starting"}

    def admin_only(request: Request, what: str) -> Principal:
        principal = who(request)
        if not principal.admin:
            raise PermissionDenied(f"only an admin may {what}")
        return principal

    def swappable() -> None:
        if not settings.hot_swap:
            raise BadRequest(
                "this server runs several Ray Serve replicas, and an adapter deploy would reach only "
                "one of them; restart it with --adapter, or serve one replica",
                "adapter",
            )

    @app.get("/v1/models")
    def models():
        """The served model; `engine`: what generates (hf, ct2 or hf+ct2, `engine` resolved); `versions`: its adapter
        versions (id, adapter path, loaded_at, active, loaded, canary: the share of users a canary serves,
        else 0), newest first."""
        versions = svc().versions.list() if state["service"] is not None else []
        active = next((v["id"] for v in versions if v["active"]), None)
        canary = next((v for v in versions if v["canary"]), None)
        summary = {
            "active_version": active,
            "canary_version": canary["id"] if canary else None,
            "canary": canary["canary"] if canary else 0.0,
            "engine": getattr(svc().engine, "engine", None) if state["service"] is not None else None,
        }
        return {
            "object": "list",
            **summary,
            "data": [
                {"id": settings.name, "object": "model", "created": 0, "owned_by": "heedful", **summary, "versions": versions}
            ],
        }

    async def switch(request: Request, what: str, act, *args) -> dict[str, Any]:
        """Run a version change for an admin; the answer says what serves now and what served before."""
        admin = admin_only(request, what)
        swappable()
        versions = svc().versions
        before = versions.active.id
        await run_in_threadpool(act, *args)
        running = versions.canary
        after = versions.active
        log.info(
            "%s by %s: active %s (was %s), canary %s", what, admin.name, after.id, before, running[0].id if running else None
        )
        return {
            "active": after.public(True),
            "canary": running[0].public(False, running[1]) if running else None,
            "previous": before,
            "changed": after.id != before,
        }

    @app.post("/v1/admin/adapters")
    async def deploy_adapter(body: DeployRequest, request: Request):
        """Admin: load an adapter folder beside the active version, then switch to it (requests keep
        flowing), or with `canary` serve it to that share of users."""
        return await switch(request, "deploy adapters", svc().versions.deploy, body.folder, body.canary)

    @app.post("/v1/admin/adapters/promote")
    async def promote_adapter(request: Request):
        """Admin: make the canary the active version for every user."""
        return await switch(request, "promote adapters", svc().versions.promote)

    @app.post("/v1/admin/adapters/rollback")
    async def rollback_adapter(request: Request):
        """Admin: drop the canary if one runs, else switch back to the version active before the current one."""
        return await switch(request, "roll back adapters", svc().versions.rollback)

    @app.get("/v1/admin/versions/stats")
    def version_stats(request: Request, since: float | None = None):
        """Admin: per version, completions and their reactions (love_rate), since `since` (unix seconds)."""
        admin_only(request, "read version statistics")
        return {"object": "list", "data": svc().version_stats(since), "logged": settings.log}

    @app.get("/v1/admin/completions/{completion_id}")
    def completion(completion_id: str, request: Request):
        """Admin: the version (and adapter) that wrote a completion, its conversation, time, user hash."""
        admin_only(request, "look up completions")
        return svc().completion(completion_id)

    @app.get("/v1/feedback/export")
    def feedback_export(request: Request, after: int = 0, limit: int = 1000):
        """Admin: feedback records with row id > `after` (a watermark), in order; `watermark`: the last id."""
        admin_only(request, "export feedback")
        if after < 0 or not 1 <= limit <= 10_000:
            raise BadRequest("after must be >= 0 and limit 1..10000", "after")
        rows = svc().store.feedback_after(after, limit)
        return {"object": "list", "data": rows, "watermark": rows[-1]["id"] if rows else after, "more": len(rows) == limit}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        service, principal = svc(), who(request)
        if body.stream:
            events = await run_in_threadpool(service.chat_stream, body, principal)
            return StreamingResponse(iterate_in_threadpool(events), media_type="text/event-stream")
        return await run_in_threadpool(service.chat, body, principal)

    @app.post("/v1/feedback")
    def feedback(body: FeedbackRequest, request: Request):
        return svc().feedback(body, who(request))

    @app.get("/v1/memory")
    def memory_list(request: Request, limit: int = 100, offset: int = 0, user: str | None = None):
        """The caller's own entries; an admin sees everyone's (or one user's with `?user=`)."""
        principal = who(request)
        if not 1 <= limit <= 1000 or offset < 0:
            raise BadRequest("limit must be 1..1000 and offset >= 0", "limit")
        if not principal.admin:
            if user is not None and user != principal.name:
                raise PermissionDenied("only an admin may list another user's memory entries")
            user = principal.name
        store = svc().store
        entries = store.entries(limit=limit, offset=offset, user=user)
        return {"object": "list", "total": store.count(user=user), "data": [e.public() for e in entries]}

    @app.delete("/v1/memory/{entry_id}")
    def memory_remove(entry_id: int, request: Request):
        """Remove one of the caller's entries (an admin: any). Another user's entry is a 404, as if absent."""
        principal = who(request)
        if not svc().store.remove(entry_id, owner=None if principal.admin else principal.name):
            raise NotFound(f"no memory entry {entry_id}")
        return {"id": entry_id, "deleted": True}

    @app.post("/v1/memory/{entry_id}/share")
    def memory_share(entry_id: int, body: ShareRequest, request: Request):
        """Admin only: make an entry retrievable by every user (`shared: false` takes it back)."""
        from feedback.quarantine import instruction_findings

        if not who(request).admin:
            raise PermissionDenied("only an admin may share memory entries with every user")
        store = svc().store
        entry = store.get([entry_id]).get(entry_id)
        if entry is None:
            raise NotFound(f"no memory entry {entry_id}")
        findings = instruction_findings(entry.clarification) if body.shared else []
        if findings and not body.force:
            raise BadRequest(
                f"memory entry {entry_id} reads like an instruction, not a clarification "
                f"({'; '.join(findings)}); send force: true to share it anyway",
                "force",
            )
        store.share(entry_id, body.shared)
        return {"id": entry_id, "shared": body.shared}

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
