"""What a served request does, apart from HTTP: retrieve, edit the prompt, generate, log; take feedback.

`ServeSettings` is everything `heedful serve` configures; `MemPromptService` holds the
model, the memory and the log. The FastAPI app (`serving.app`) and the Ray Serve
deployment (`serving.ray_app`) are thin shells around it.

Every call acts for a `Principal` (who the bearer token says the caller is; see
`serving.identity`). With several users, a request's `user` field must name the caller
(else 403), memory entries and conversations belong to the caller, and feedback is only
accepted on one's own conversations. With one user, `user` is a free label kept in the log.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.generation import ServeEngineSetting, check_local_engine
from pipeline.schema import FollowUp, Preference, Provenance, Reaction, VerbalFeedback

from .identity import SINGLE_USER, Principal
from .prompting import DEFAULT_TEMPLATE, check_template, clean_text, render
from .retrieval import MemoryHit, RetrievalSettings, Retriever
from .schemas import ChatRequest, FeedbackRequest
from .store import Conversation, MemoryStore
from .versions import AdapterVersions, Version


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
    log: bool = Field(default=True, description="False (--no-log): answer, but store no conversation or feedback")
    hot_swap: bool = Field(
        default=True,
        description="admins may deploy adapters at run time (off with several "
        "Ray Serve replicas: a request reaches only one of them)",
    )
    template: str = DEFAULT_TEMPLATE
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    max_tokens_default: int = Field(default=256, ge=1)
    max_tokens_limit: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_batch: int = Field(default=16, ge=1, description="concurrent requests generated together (1: one at a time)")
    batch_window_ms: float = Field(default=5.0, ge=0, le=1000, description="how long a request waits for company")
    device: str | None = None
    engine: ServeEngineSetting = "auto"
    token_file: str | None = None
    users_file: str | None = Field(default=None, description="several users: tokens (hashed), names, roles")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template(value)

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        return check_local_engine(value)

    @model_validator(mode="after")
    def _one_auth_mode(self):
        if self.users_file and self.token_file:
            raise ValueError("give either users_file (several users) or token_file (one user), not both")
        if self.users_file and self.retrieval.scope == "global":
            raise ValueError(
                "scope 'global' would let every user's clarifications steer every other user's "
                "prompts; with several users an admin shares chosen entries instead "
                "(`heedful memory share ID` or POST /v1/memory/ID/share)"
            )
        return self

    @property
    def multi_user(self) -> bool:
        return self.users_file is not None

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        return Path(self.adapter).name if self.adapter else self.model


class NotFound(LookupError):
    pass


class PermissionDenied(PermissionError):
    """The caller is authenticated but may not do this (403)."""


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
        self._given_engine = engine

        def load_engine(adapter: str | None):
            return ChatEngine(
                settings.model,
                adapter,
                settings.device,
                max_batch=settings.max_batch,
                batch_window=settings.batch_window_ms / 1000,
                engine=settings.engine,
            )

        embedder = embedder if embedder is not None else MiniLMEmbedder()
        memory = Path(settings.memory).expanduser()
        self.store = MemoryStore(memory, embedder_name=embedder.name, dim=embedder.dim)
        # the adapter versions: `engine` is always the active version's; canary buckets are keyed by a
        # secret salt kept in the memory file, so a user stays on the same side across restarts
        self.versions = AdapterVersions(load_engine, settings.adapter, engine, salt=self.store.salt("canary_salt"))
        # one user: the whole memory is theirs (scope global); several: own entries + shared ones
        retrieval = settings.retrieval if settings.multi_user else settings.retrieval.model_copy(update={"scope": "global"})
        self.retriever = Retriever(self.store, embedder, retrieval, index_path=memory.with_name(memory.name + ".hnsw"))
        self.default_principal = Principal(SINGLE_USER, "admin", verified=False, auth="none")

    @property
    def engine(self):
        return self.versions.active.engine

    def _who(self, principal: Principal | None, claimed: str | None) -> Principal:
        """The acting principal; with several users a `user` field naming someone else is refused."""
        principal = principal or self.default_principal
        if self.settings.multi_user and claimed is not None and claimed != principal.name:
            raise PermissionDenied(
                f"the request's user field ('{claimed}') does not match the authenticated "
                f"user ('{principal.name}'); leave it out or send your own name"
            )
        return principal

    @staticmethod
    def user_key(request: ChatRequest, principal: Principal) -> str:
        """Whom a request is for, for canary buckets and `user_hash`: the authenticated user with several
        users (their `user` field, if any, must be that name); with one user (every caller is the same
        principal) the request's `user` label, as an app fronting many end users sends it, else the
        principal's name, so unlabelled traffic to a single-user server all falls on one side."""
        return request.user or principal.name

    def _shown(self, hits: list[MemoryHit], principal: Principal) -> list[dict[str, Any]]:
        return [h.public(principal.name, everything=not self.settings.multi_user) for h in hits]

    # ------------------------------------------------------------------ chat

    def prepare(
        self, request: ChatRequest, principal: Principal | None = None
    ) -> tuple[list[dict[str, str]], list[dict[str, str]], list[MemoryHit]]:
        """(original messages, messages sent to the model, memory hits used)."""
        principal = self._who(principal, request.user)
        if request.model != self.settings.name:
            raise NotFound(f"model '{request.model}' is not served here; this server serves '{self.settings.name}'")
        messages = request.plain_messages()
        query = messages[-1]["content"]
        hits: list[MemoryHit] = []
        if self.settings.memory_enabled and request.memory and query.strip():
            hits = self.retriever.lookup(query, user=principal.name)
        sent = [dict(m) for m in messages]
        if hits:
            sent[-1]["content"] = render(self.settings.template, query, hits, self.engine.special_tokens)
            self.store.record_hits([h.entry.id for h in hits])
        return messages, sent, hits

    def _max_tokens(self, request: ChatRequest) -> int:
        value = request.max_completion_tokens or request.max_tokens or self.settings.max_tokens_default
        if value > self.settings.max_tokens_limit:
            raise BadRequest(f"max_tokens {value} is above this server's limit of {self.settings.max_tokens_limit}", "max_tokens")
        return value

    def _gen_args(self, request: ChatRequest) -> dict[str, Any]:
        return {
            "max_tokens": self._max_tokens(request),
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop or [],
            "seed": request.seed,
        }

    def _thread(self, request: ChatRequest, principal: Principal) -> tuple[str, Conversation | None]:
        """(conversation id, the reply this turn follows up, if any). A conversation id that is not the
        caller's (or unknown) is a 404, as if absent; without logging it is only echoed back."""
        if request.conversation_id is None:
            return new_id("conv"), None
        if not self.settings.log:
            return request.conversation_id, None
        previous = self.store.last_in_conversation(request.conversation_id)
        if previous is None or (self.settings.multi_user and previous.user != principal.name):
            raise NotFound(
                f"no conversation '{request.conversation_id}' (send the `conversation_id` an earlier "
                "reply of this server returned to you, or leave it out to start one)"
            )
        return request.conversation_id, previous

    def _log(
        self,
        conv_id: str,
        request: ChatRequest,
        principal: Principal,
        messages,
        sent,
        text: str,
        hits: list[MemoryHit],
        thread: str,
        previous: Conversation | None,
        version: Version,
    ) -> None:
        if not self.settings.log:
            return
        self.store.log_conversation(
            Conversation(
                conv_id,
                time.time(),
                principal.name,
                self.settings.model,
                version.adapter,
                messages,
                sent,
                text,
                [h.entry.id for h in hits],
                client_user=self.store.hash_label(request.user),
                conversation=thread,
                adapter_version=version.id,
            )
        )
        if previous is not None:  # this turn is the user's answer to the previous reply: a follow-up record
            rec = FollowUp(
                id=f"{previous.id}:followup:{conv_id}",
                prompt=previous.messages,
                response=previous.response,
                followup=messages[-1]["content"],
                provenance=self._provenance(previous, principal, request.user, feedback="followup", next_completion_id=conv_id),
            )
            self.store.log_feedback(previous.id, rec.kind, rec.model_dump(mode="json"))

    def _provenance(self, conv: Conversation, principal: Principal, client_user: str | None, **extra) -> Provenance:
        base = {
            "memory_ids": conv.memory_ids,
            "prompt_edited": conv.sent_messages != conv.messages,
            "author_verified": principal.verified,
            "auth": principal.auth,
            "client_user": self.store.hash_label(client_user) if client_user else conv.client_user,
            "completion_id": conv.id,
            "conversation_id": conv.conversation,
            "adapter_version": conv.adapter_version,
        }
        return Provenance(
            source="serving",
            annotator=principal.name,
            model=conv.model,
            adapter=conv.adapter,
            dataset=str(self.store.path),
            record_id=conv.id,
            extra=json.dumps({**base, **extra}),
        )

    def _ids(self, conv_id: str, thread: str, version: Version) -> dict[str, Any]:
        return {"conversation_id": thread, "adapter_version": version.id, "logged": self.settings.log}

    def chat(self, request: ChatRequest, principal: Principal | None = None) -> dict[str, Any]:
        from .engine import PromptTooLong

        principal = self._who(principal, request.user)
        thread, previous = self._thread(request, principal)
        messages, sent, hits = self.prepare(request, principal)
        with self.versions.acquire(self.user_key(request, principal)) as version:
            try:
                out = version.engine.generate(sent, **self._gen_args(request))
            except PromptTooLong as exc:
                raise BadRequest(str(exc), "messages") from None
        conv_id = new_id("chatcmpl")
        self._log(conv_id, request, principal, messages, sent, out.text, hits, thread, previous, version)
        return {
            "id": conv_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out.text},
                    "finish_reason": out.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens,
            },
            "system_fingerprint": None,
            "memory": self._shown(hits, principal),
            **self._ids(conv_id, thread, version),
        }

    def chat_stream(self, request: ChatRequest, principal: Principal | None = None) -> Iterator[str]:
        """Server-sent events in OpenAI's chunk format; validation errors raise before the first event."""
        from .engine import PromptTooLong

        principal = self._who(principal, request.user)
        thread, previous = self._thread(request, principal)
        messages, sent, hits = self.prepare(request, principal)
        held = self.versions.acquire(self.user_key(request, principal))
        # released when the events end or are abandoned -- unstarted too: dropping them drops `held`, whose
        # generator (`acquire`) is then closed, and its `finally` releases the version
        version = held.__enter__()
        try:
            n_prompt, deltas, info = version.engine.stream(sent, **self._gen_args(request))
        except PromptTooLong as exc:
            held.__exit__(None, None, None)
            raise BadRequest(str(exc), "messages") from None
        except BaseException:
            held.__exit__(None, None, None)
            raise
        conv_id = new_id("chatcmpl")
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {
                "id": conv_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.settings.name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra,
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def events() -> Iterator[str]:
            try:
                yield chunk(
                    {"role": "assistant", "content": ""},
                    memory=self._shown(hits, principal),
                    **self._ids(conv_id, thread, version),
                )
                parts = []
                for piece in deltas:
                    parts.append(piece)
                    yield chunk({"content": piece})
            finally:
                # stop the generation first: releasing a retired version's last user closes its engine,
                # which waits for the model's lock -- held by a generation nobody reads until it has
                # written all of max_tokens, while the thread that dropped the stream (the event loop) waits
                deltas.close()
                held.__exit__(None, None, None)
            yield chunk({}, info["finish_reason"])
            text = "".join(parts)
            self._log(conv_id, request, principal, messages, sent, text, hits, thread, previous, version)
            if request.stream_options and request.stream_options.include_usage:
                usage = {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": info["completion_tokens"],
                    "total_tokens": n_prompt + info["completion_tokens"],
                }
                body = {
                    "id": conv_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.settings.name,
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return events()

    # ------------------------------------------------------------------ feedback

    def feedback(self, request: FeedbackRequest, principal: Principal | None = None) -> dict[str, Any]:
        """Record feedback on one of the caller's own conversations (another user's is a 404, as if absent)."""
        principal = self._who(principal, request.user)
        if not self.settings.log:
            raise BadRequest(
                "this server runs with logging off (--no-log): it stores no completions and no "
                "feedback, so feedback cannot be accepted",
                "completion_id",
            )
        conv = self.store.conversation(request.target)
        if conv is None or (self.settings.multi_user and conv.user != principal.name):
            raise NotFound(
                f"no conversation '{request.target}': no chat completion served to you has this id "
                "(send the `id` of a chat completion as completion_id); nothing was stored"
            )
        user = principal.name  # the verified author; the `user` field is at most a label

        def provenance(**extra) -> Provenance:
            return self._provenance(conv, principal, request.user, **extra)

        memory_id = None
        records: list[VerbalFeedback | Reaction | Preference] = []

        if request.clarification is not None:
            clarification = clean_text(request.clarification, self.engine.special_tokens)
            if not clarification:
                raise BadRequest("clarification is empty once control characters and special tokens are removed", "clarification")
            key = conv.last_user_message
            entry = self.retriever.add(
                key, clarification, user=user, model=conv.model, adapter=conv.adapter, conversation_id=conv.id
            )
            memory_id = entry.id
            rec = VerbalFeedback(
                id=f"{conv.id}:clarification:{entry.id}",
                prompt=conv.messages,
                response=conv.response,
                critique=clarification,
                judgment="needs_work",
                scope=key,
                provenance=provenance(feedback="clarification", memory_id=entry.id),
            )
            records.append(rec)
        if request.reaction is not None:
            records.append(
                Reaction(
                    id=new_id(f"{conv.id}:reaction"),
                    prompt=conv.messages,
                    response=conv.response,
                    reaction=request.reaction,
                    user_id=user,
                    provenance=provenance(feedback="reaction"),
                )
            )
        if request.critique is not None:
            records.append(
                VerbalFeedback(
                    id=new_id(f"{conv.id}:critique"),
                    prompt=conv.messages,
                    response=conv.response,
                    critique=request.critique,
                    judgment=request.judgment,
                    provenance=provenance(feedback="critique"),
                )
            )
        if request.edit is not None:
            edit = clean_text(request.edit, self.engine.special_tokens)
            records.append(
                Preference(
                    id=new_id(f"{conv.id}:edit"),
                    prompt=conv.messages,
                    chosen=edit,
                    rejected=conv.response,
                    rationale=request.critique,
                    provenance=provenance(feedback="edit"),
                )
            )
        for record in records:
            self.store.log_feedback(conv.id, record.kind, record.model_dump(mode="json"))
        # fold the WAL into the .db file, so the file's content hash (a pipeline input's fingerprint) moves
        self.store.checkpoint(passive=True)
        return {
            "completion_id": conv.id,
            "conversation_id": conv.conversation,
            "adapter_version": conv.adapter_version,
            "memory_id": memory_id,
            "records": [r.id for r in records],
        }

    # ------------------------------------------------------------------ admin views

    def completion(self, completion_id: str) -> dict[str, Any]:
        """Which version wrote a completion, for whom (a salted hash), when: what `heedful trace` starts from."""
        if not self.settings.log:
            raise NotFound(f"no completion '{completion_id}': this server runs with logging off (--no-log)")
        conv = self.store.conversation(completion_id)
        if conv is None:
            raise NotFound(f"no completion '{completion_id}' was served here (give the `id` of a chat completion)")
        return {
            "id": conv.id,
            "conversation_id": conv.conversation,
            "version": conv.adapter_version,
            "adapter": conv.adapter,
            "created": conv.created,
            "user_hash": conv.client_user or self.store.hash_label(conv.user),
        }

    def version_stats(self, since: float | None = None) -> list[dict[str, Any]]:
        """Live counts per version (`MemoryStore.version_stats`), with the versions serving now even
        before their first completion; `serving`: active / canary / None, `share`: of users served now."""
        rows = {row["version"]: row for row in self.store.version_stats(since)}
        running = self.versions.canary
        share = running[1] if running else 0.0
        serving: dict[str, tuple[str | None, float]] = {self.versions.active.id: ("active", round(1.0 - share, 6))}
        if running is not None:
            serving[running[0].id] = ("canary", share)
        empty = {"completions": 0, "reactions": 0, "love": 0, "dislike": 0, "neutral": 0, "love_rate": None}
        for vid in serving:
            rows.setdefault(vid, {"version": vid, **empty, "first": None, "last": None})
        out = []
        for vid, row in rows.items():
            role, now = serving.get(vid, (None, 0.0))
            out.append({**row, "serving": role, "share": now})
        return out

    def close(self) -> None:
        try:
            self.retriever.save_index()
        finally:
            self.store.checkpoint()
            self.versions.close(keep=self._given_engine)
