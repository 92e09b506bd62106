"""Request bodies of the serving API, with the limits that keep one request from hurting the server.

Unknown top-level fields are rejected, as OpenAI's API does, so a typo is a 400 rather
than a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 64
MAX_MESSAGE_CHARS = 16_000
MAX_CLARIFICATION_CHARS = 500
MAX_CRITIQUE_CHARS = 4_000


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="text, or a list of text parts")
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _size(cls, value):
        text = value if isinstance(value, str) else "".join(p.text for p in value)
        if len(text) > MAX_MESSAGE_CHARS:
            raise ValueError(f"message is {len(text)} characters, more than the limit of {MAX_MESSAGE_CHARS}")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**32, description="0 <= seed < 2**32, as the engines' RNGs take")
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float = Field(default=0.0, ge=0, le=0, description="not supported: only 0")
    frequency_penalty: float = Field(default=0.0, ge=0, le=0, description="not supported: only 0")
    logprobs: bool = Field(default=False, description="not supported")
    metadata: dict[str, str] | None = None
    # heedful extensions (send with the OpenAI client's `extra_body`): turn memory off for this request;
    # continue a conversation (the `conversation_id` an earlier reply returned): this turn is then kept
    # as the follow-up of that conversation's last reply
    memory: bool = True
    conversation_id: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None and (len(value) > 4 or any(len(s) > 64 for s in value)):
            raise ValueError("at most 4 stop strings of at most 64 characters")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

    @model_validator(mode="after")
    def _last_is_user(self):
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return self

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class FeedbackRequest(BaseModel):
    """Feedback on one served reply, named by its completion id. A clarification goes to memory;
    everything is logged as heedful records (reaction, verbal feedback, preference from an edit).

    `completion_id` is the `id` of the chat completion; `conversation_id` is its older name for the
    same thing (kept so existing clients work): give one of them.
    """

    model_config = ConfigDict(extra="forbid")
    completion_id: str | None = Field(default=None, min_length=1, max_length=128, description="the `id` of the chat completion")
    conversation_id: str | None = Field(default=None, min_length=1, max_length=128, description="older name of completion_id")
    clarification: str | None = Field(default=None, min_length=1, max_length=MAX_CLARIFICATION_CHARS)
    reaction: Literal["love", "neutral", "dislike"] | None = None
    critique: str | None = Field(default=None, min_length=1, max_length=MAX_CRITIQUE_CHARS)
    judgment: Literal["good", "needs_work"] | None = None
    edit: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MESSAGE_CHARS,
        description="the reply as the user would have wanted it (a preference over the reply)",
    )
    user: str | None = Field(
        default=None, max_length=256, description="with several users: must be the caller's own name (or left out)"
    )

    @model_validator(mode="after")
    def _something(self):
        if self.completion_id is None and self.conversation_id is None:
            raise ValueError("give completion_id (the `id` of the chat completion)")
        if self.completion_id is not None and self.conversation_id is not None and self.completion_id != self.conversation_id:
            raise ValueError("completion_id and conversation_id (its older name) differ; give one")
        if all(v is None for v in (self.clarification, self.reaction, self.critique, self.edit)):
            raise ValueError("give at least one of clarification, reaction, critique, edit")
        if self.clarification is not None and not self.clarification.strip():
            raise ValueError("clarification is blank")
        if self.edit is not None and not self.edit.strip():
            raise ValueError("edit is blank")
        return self

    @property
    def target(self) -> str:
        return self.completion_id or self.conversation_id  # type: ignore[return-value]


class DeployRequest(BaseModel):
    """Admin: load an adapter folder (on the server's machine) as a new version and switch to it, or,
    with `canary`, serve it to that share of users beside the active version.

    `adapter` is the folder; `path` is its older name (kept so existing clients work): give one.
    """

    model_config = ConfigDict(extra="forbid")
    adapter: str | None = Field(default=None, min_length=1, max_length=4096, description="absolute path of a PEFT adapter folder")
    path: str | None = Field(default=None, min_length=1, max_length=4096, description="older name of adapter")
    canary: float | None = Field(default=None, gt=0, lt=1, description="share of users who get it (0..1, exclusive)")

    @model_validator(mode="after")
    def _one_folder(self):
        if self.adapter is None and self.path is None:
            raise ValueError("give adapter (the absolute path of a PEFT adapter folder)")
        if self.adapter is not None and self.path is not None:
            raise ValueError("give adapter or path (its older name), not both")
        return self

    @property
    def folder(self) -> str:
        return self.adapter or self.path  # type: ignore[return-value]


class ShareRequest(BaseModel):
    """Admin: share a memory entry with every user, or take it back."""

    model_config = ConfigDict(extra="forbid")
    shared: bool = True
    force: bool = Field(default=False, description="share even what the quarantine's text check flags")


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape, which its client turns into a typed exception."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
