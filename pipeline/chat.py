"""The one place that turns a prompt into chat messages, text, token ids and an id.

A prompt in heedful is either a plain string (one user turn) or a list of chat messages
(`{"role", "content"}`); every stage accepts both. Stages, trainers, reward models and the
Argilla bridge all go through these functions, so a prompt renders the same way (and gets
the same id) wherever it travels.

Prompt ids (`prompt_id`) are the first 12 hex digits of a SHA-1: of the user's text when the
prompt is a single user turn (the id `generate` has always written, so old `responses`
files keep grouping with new ones), else of the messages as sorted-key JSON. A string and
the same text as one user message therefore share an id. The stage's own `system_prompt`
is not part of the id: the id names the data row's prompt.

No heavy imports: stage configs and the Argilla bridge import this module.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

Messages = list[dict[str, str]]


def as_messages(prompt: Any, system_prompt: str | None = None) -> Messages:
    """A plain-text prompt becomes one user turn; a conversation is copied as role/content
    pairs. `system_prompt` is put first unless the conversation already has a system turn."""
    if isinstance(prompt, (list, tuple)):
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    elif isinstance(prompt, dict):
        raise TypeError(f"a prompt is a string or a list of chat messages, got one message {prompt!r:.80}")
    else:
        messages = [{"role": "user", "content": str(prompt)}]
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def row_messages(row: dict[str, Any], prompt_field: str = "prompt", system_prompt: str | None = None) -> Messages:
    """A data row's prompt as the sampler saw it: with the `system_prompt` column that
    `generate` writes (or the given one) in front."""
    return as_messages(row[prompt_field], row.get("system_prompt") or system_prompt)


def prompt_id(prompt: Any) -> str:
    """A stable id of a prompt (see the module docstring for the scheme)."""
    messages = as_messages(prompt)
    if len(messages) == 1 and messages[0]["role"] == "user":
        blob = messages[0]["content"]
    else:
        blob = json.dumps(messages, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def row_prompt_id(row: dict[str, Any], prompt_field: str = "prompt") -> str:
    """The row's own `id` when it has one, else `prompt_id` of its prompt."""
    return str(row.get("id") or prompt_id(row[prompt_field]))


def prompt_text(prompt: Any) -> str:
    """The words of a prompt without assistant turns (system context included), one turn a line."""
    return "\n".join(m["content"] for m in as_messages(prompt) if m["role"] != "assistant")


def last_user_text(prompt: Any) -> str:
    """The last user turn's words: the key that groups prompts for leak-free splits (two
    prompts asking the same question over different passages land on the same side)."""
    users = [m["content"] for m in as_messages(prompt) if m["role"] == "user"]
    return users[-1] if users else json.dumps(as_messages(prompt), sort_keys=True)


def split_prompt(prompt: Any) -> tuple[str, str]:
    """(the user/assistant turns as text, the context from system messages) for encoders
    that read a sentence pair instead of a chat template."""
    turns: list[str] = []
    context: list[str] = []
    for m in as_messages(prompt):
        (context if m["role"] == "system" else turns).append(
            m["content"] if m["role"] == "user" else f"{m['role']}: {m['content']}"
        )
    return "\n".join(turns), "\n".join(context)


def render(tokenizer, prompt: Any, system_prompt: str | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt as the model reads it: the tokenizer's chat template with the assistant turn
    opened, or (a base model without a template) the turns' text one per line."""
    messages = as_messages(prompt, system_prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return "\n".join(m["content"] for m in messages)


def render_many(tokenizer, prompts: list[Any], system_prompt: str | None = None) -> list[str]:
    return [render(tokenizer, p, system_prompt) for p in prompts]


def render_ids(tokenizer, prompt: Any, system_prompt: str | None = None) -> list[int]:
    """Token ids of `render` (no extra special tokens: the template carries them)."""
    return tokenizer(render(tokenizer, prompt, system_prompt), add_special_tokens=False)["input_ids"]


def reply_text(reply: Any) -> str:
    """A reply's words: a string as it is; a conversational completion (TRL's list of messages) as
    its assistant messages' contents, a blank line between them (a message without a role is the
    assistant's; tool or user messages, and an assistant tool call without text, are not the reply).
    The one reading of a reply for reward models, SFT, Chain-of-Hindsight and Argilla records, which
    may hold either shape."""
    if isinstance(reply, (list, tuple)):
        said = [
            content_text(m.get("content")) for m in reply if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
        ]
        return "\n\n".join(text for text in said if text)
    return str(reply)


def content_text(content: Any) -> str:
    """A message's words: a string, or OpenAI's list of content parts (their `text` parts joined);
    "" for none (a tool call)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def assistant(text: str) -> Messages:
    """A reply as TRL's conversational completion (one assistant message)."""
    return [{"role": "assistant", "content": text}]


def matched_pair(prompt: Any, chosen: Any, rejected: Any) -> dict[str, Any]:
    """A preference row whose replies have the prompt's shape: TRL joins them by concatenation.

    Served edits store the prompt as messages and the replies as text; a conversational prompt
    gets each text reply as one assistant message (and a text prompt keeps text replies)."""
    if isinstance(prompt, list):
        chosen = assistant(chosen) if isinstance(chosen, str) else chosen
        rejected = assistant(rejected) if isinstance(rejected, str) else rejected
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
