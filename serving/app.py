"""The HTTP surface: OpenAI-compatible chat completions, feedback, memory admin; auth and limits.

Every error is a JSON body in OpenAI's shape (`{"error": {"message", "type", "param"}}`),
which the `openai` client raises as a typed exception with that message. The bearer token
is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
import stat
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException

from .schemas import ChatRequest, FeedbackRequest, error_body
from .service import BadRequest, MemPromptService, NotFound, ServeSettings

log = logging.getLogger("heedful.serving")
OPEN_PATHS = {"/health"}


class TokenFileError(RuntimeError):
    pass


def load_token(path: str | Path) -> str:
    """The bearer token from a file only its owner can read (mode 0600 or stricter)."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise TokenFileError(f"token file {path} not found") from None
    if not stat.S_ISREG(info.st_mode):
        raise TokenFileError(f"token file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise TokenFileError(f"token file {path} is readable by others (mode {mode:04o}); run: chmod 600 {path}")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise TokenFileError(f"token file {path} holds a token shorter than 16 characters")
    return token


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
            return await _send_json(send, 413, error_body(f"request body is {int(length)} bytes; the limit is "
                                                          f"{self.limit}"))
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
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def build_app(settings: ServeSettings, service: MemPromptService | None = None) -> FastAPI:
    """The app; the service (model, memory) is created at startup unless one is given."""
    token = load_token(settings.token_file) if settings.token_file else None
    state: dict = {"service": service}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state["service"] is None:
            state["service"] = await run_in_threadpool(MemPromptService, settings)
        yield
        await run_in_threadpool(state["service"].close)

    app = FastAPI(title="heedful serve (MemPrompt)", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    def svc() -> MemPromptService:
        if state["service"] is None:  # hosts that skip the ASGI lifespan
            state["service"] = MemPromptService(settings)
        return state["service"]

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if token is not None and request.url.path not in OPEN_PATHS:
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return JSONResponse(error_body("missing or invalid bearer token (send 'Authorization: Bearer ...')",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
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

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return JSONResponse(error_body(str(exc), code="not_found"), status_code=404)

    @app.get("/health")
    def health():
        return {"status": "ok" if state["service"] is not None else "starting"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": settings.name, "object": "model", "created": 0,
                                            "owned_by": "heedful"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        service = svc()
        if body.stream:
            events = await run_in_threadpool(service.chat_stream, body)
            return StreamingResponse(iterate_in_threadpool(events), media_type="text/event-stream")
        return await run_in_threadpool(service.chat, body)

    @app.post("/v1/feedback")
    def feedback(body: FeedbackRequest):
        return svc().feedback(body)

    @app.get("/v1/memory")
    def memory_list(limit: int = 100, offset: int = 0, user: str | None = None):
        if not 1 <= limit <= 1000 or offset < 0:
            raise BadRequest("limit must be 1..1000 and offset >= 0", "limit")
        service = svc()
        entries = service.store.entries(limit=limit, offset=offset, user=user)
        return {"object": "list", "total": service.store.count(), "data": [e.public() for e in entries]}

    @app.delete("/v1/memory/{entry_id}")
    def memory_remove(entry_id: int):
        if not svc().store.remove(entry_id):
            raise NotFound(f"no memory entry {entry_id}")
        return {"id": entry_id, "deleted": True}

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
