"""What a served request does, apart from HTTP: retrieve, edit the prompt, generate, log; take feedback.

`ServeSettings` is everything `heedful serve` configures; `MemPromptService` holds the
model, the memory and the log. The FastAPI app (`serving.app`) and the Ray Serve
deployment (`serving.ray_app`) are thin shells around it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.schema import Provenance, Reaction, VerbalFeedback

from .prompting import DEFAULT_TEMPLATE, check_template, clean_text, render
from .retrieval import MemoryHit, RetrievalSettings, Retriever
from .schemas import ChatRequest, FeedbackRequest
from .store import Conversation, MemoryStore


def default_memory_path() -> Path:
    from pipeline.paths import heedful_home

    return heedful_home() / "memory" / "memory.db"


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = "smollm2-135m"
    adapter: str | None = None
    served_name: str | None = Field(default=None, description="model id clients send (default: the model name)")
    memory: str = Field(default_factory=lambda: str(default_memory_path()))
    memory_enabled: bool = True
    template: str = DEFAULT_TEMPLATE
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    max_tokens_default: int = Field(default=256, ge=1)
    max_tokens_limit: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    device: str | None = None
    token_file: str | None = None

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template(value)

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        return Path(self.adapter).name if self.adapter else self.model


class NotFound(LookupError):
    pass


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class MemPromptService:
    def __init__(self, settings: ServeSettings, engine=None, embedder=None):
        from .embedder import MiniLMEmbedder
        from .engine import ChatEngine

        self.settings = settings
        self.engine = engine if engine is not None else ChatEngine(settings.model, settings.adapter, settings.device)
        embedder = embedder if embedder is not None else MiniLMEmbedder()
        memory = Path(settings.memory).expanduser()
        self.store = MemoryStore(memory, embedder_name=embedder.name, dim=embedder.dim)
        self.retriever = Retriever(self.store, embedder, settings.retrieval,
                                   index_path=memory.with_name(memory.name + ".hnsw"))

    # ------------------------------------------------------------------ chat

    def prepare(self, request: ChatRequest) -> tuple[list[dict[str, str]], list[dict[str, str]], list[MemoryHit]]:
        """(original messages, messages sent to the model, memory hits used)."""
        if request.model != self.settings.name:
            raise NotFound(f"model '{request.model}' is not served here; this server serves '{self.settings.name}'")
        messages = request.plain_messages()
        query = messages[-1]["content"]
        hits: list[MemoryHit] = []
        if self.settings.memory_enabled and request.memory and query.strip():
            hits = self.retriever.lookup(query, user=request.user)
        sent = [dict(m) for m in messages]
        if hits:
            sent[-1]["content"] = render(self.settings.template, query, hits, self.engine.special_tokens)
            self.store.record_hits([h.entry.id for h in hits])
        return messages, sent, hits

    def _max_tokens(self, request: ChatRequest) -> int:
        value = request.max_completion_tokens or request.max_tokens or self.settings.max_tokens_default
        if value > self.settings.max_tokens_limit:
            raise BadRequest(f"max_tokens {value} is above this server's limit of {self.settings.max_tokens_limit}",
                             "max_tokens")
        return value

    def _gen_args(self, request: ChatRequest) -> dict[str, Any]:
        return {"max_tokens": self._max_tokens(request), "temperature": request.temperature, "top_p": request.top_p,
                "stop": request.stop or [], "seed": request.seed}

    def _log(self, conv_id: str, request: ChatRequest, messages, sent, text: str, hits: list[MemoryHit]) -> None:
        self.store.log_conversation(Conversation(
            conv_id, time.time(), request.user, self.settings.model, self.settings.adapter, messages, sent, text,
            [h.entry.id for h in hits]))

    def chat(self, request: ChatRequest) -> dict[str, Any]:
        from .engine import PromptTooLong

        messages, sent, hits = self.prepare(request)
        try:
            out = self.engine.generate(sent, **self._gen_args(request))
        except PromptTooLong as exc:
            raise BadRequest(str(exc), "messages") from None
        conv_id = new_id("chatcmpl")
        self._log(conv_id, request, messages, sent, out.text, hits)
        return {
            "id": conv_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": out.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
            "system_fingerprint": None,
            "memory": [h.public() for h in hits],
        }

    def chat_stream(self, request: ChatRequest) -> Iterator[str]:
        """Server-sent events in OpenAI's chunk format; validation errors raise before the first event."""
        from .engine import PromptTooLong

        messages, sent, hits = self.prepare(request)
        try:
            n_prompt, deltas, info = self.engine.stream(sent, **self._gen_args(request))
        except PromptTooLong as exc:
            raise BadRequest(str(exc), "messages") from None
        conv_id = new_id("chatcmpl")
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {"id": conv_id, "object": "chat.completion.chunk", "created": created, "model": self.settings.name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def events() -> Iterator[str]:
            yield chunk({"role": "assistant", "content": ""}, memory=[h.public() for h in hits])
            parts = []
            for piece in deltas:
                parts.append(piece)
                yield chunk({"content": piece})
            yield chunk({}, info["finish_reason"])
            text = "".join(parts)
            self._log(conv_id, request, messages, sent, text, hits)
            if request.stream_options and request.stream_options.include_usage:
                usage = {"prompt_tokens": n_prompt, "completion_tokens": info["completion_tokens"],
                         "total_tokens": n_prompt + info["completion_tokens"]}
                body = {"id": conv_id, "object": "chat.completion.chunk", "created": created,
                        "model": self.settings.name, "choices": [], "usage": usage}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return events()

    # ------------------------------------------------------------------ feedback

    def feedback(self, request: FeedbackRequest) -> dict[str, Any]:
        conv = self.store.conversation(request.conversation_id)
        if conv is None:
            raise NotFound(f"no conversation '{request.conversation_id}' (use the `id` of a chat completion "
                           "served by this server)")
        user = request.user or conv.user
        memory_id = None
        records = []
        extra_base = {"memory_ids": conv.memory_ids, "prompt_edited": conv.sent_messages != conv.messages}

        def provenance(**extra) -> Provenance:
            return Provenance(source="serving", annotator=user, model=conv.model, adapter=conv.adapter,
                              dataset=str(self.store.path), record_id=conv.id,
                              extra=json.dumps({**extra_base, **extra}))

        if request.clarification is not None:
            clarification = clean_text(request.clarification, self.engine.special_tokens)
            if not clarification:
                raise BadRequest("clarification is empty once control characters and special tokens are removed",
                                 "clarification")
            key = conv.last_user_message
            entry = self.retriever.add(key, clarification, user=user, model=conv.model, adapter=conv.adapter,
                                       conversation_id=conv.id)
            memory_id = entry.id
            rec = VerbalFeedback(id=f"{conv.id}:clarification:{entry.id}", prompt=conv.messages,
                                 response=conv.response, critique=clarification, judgment="needs_work",
                                 scope=key, provenance=provenance(feedback="clarification", memory_id=entry.id))
            records.append(rec)
        if request.reaction is not None:
            records.append(Reaction(id=new_id(f"{conv.id}:reaction"), prompt=conv.messages, response=conv.response,
                                    reaction=request.reaction, user_id=user,
                                    provenance=provenance(feedback="reaction")))
        if request.critique is not None:
            records.append(VerbalFeedback(id=new_id(f"{conv.id}:critique"), prompt=conv.messages,
                                          response=conv.response, critique=request.critique,
                                          judgment=request.judgment, provenance=provenance(feedback="critique")))
        for rec in records:
            self.store.log_feedback(conv.id, rec.kind, rec.model_dump(mode="json"))
        # fold the WAL into the .db file, so the file's content hash (a pipeline input's fingerprint) moves
        self.store.checkpoint(passive=True)
        return {"conversation_id": conv.id, "memory_id": memory_id, "records": [r.id for r in records]}

    def close(self) -> None:
        try:
            self.retriever.save_index()
        finally:
            self.store.checkpoint()
