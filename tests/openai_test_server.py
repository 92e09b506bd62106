"""A test server: a tiny OpenAI-compatible chat-completions endpoint (FastAPI) over a local HF model.

Only what the simulator's `openai` backend uses: /v1/chat/completions with max_tokens,
temperature, top_p, seed and top_logprobs of the first token, behind a bearer key.
It exists so tests exercise the real `openai` client over real HTTP; it is not a server
to deploy (use vLLM, TGI or Ollama).
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel


class ChatRequest(BaseModel):
    model: str
    messages: list[dict]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def build_app(model_name: str, api_key: str, adapter: str | Path | None = None) -> tuple[FastAPI, dict]:
    import torch

    from pipeline.chat import render_many
    from pipeline.generation import SamplingSettings, chat_generate
    from pipeline.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name, adapter=adapter).eval()
    lock = threading.Lock()
    stats: dict = {"requests": 0, "logprob_requests": 0, "sampling": []}  # sampling: fields each request sent
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest, authorization: str | None = Header(default=None)):
        if authorization != f"Bearer {api_key}":
            raise HTTPException(status_code=401, detail="invalid api key")
        with lock:
            stats["requests"] += 1
            stats["sampling"].append({k: getattr(req, k) for k in ("temperature", "top_p") if k in req.model_fields_set})
            logprobs = None
            if req.logprobs:
                stats["logprob_requests"] += 1
                enc = tokenizer(render_many(tokenizer, [req.messages]), return_tensors="pt", add_special_tokens=False)
                with torch.no_grad():
                    lp = model(**enc).logits[0, -1].log_softmax(-1)
                top = lp.topk(req.top_logprobs or 1)
                # Yes/No are always reported so the caller's P(Yes) is defined even for a random model
                ids = list(
                    dict.fromkeys(
                        top.indices.tolist() + [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No")]
                    )
                )
                cands = [{"token": tokenizer.decode([i]), "logprob": float(lp[i]), "bytes": None} for i in ids]
                logprobs = {
                    "content": [
                        {"token": cands[0]["token"], "logprob": cands[0]["logprob"], "bytes": None, "top_logprobs": cands}
                    ]
                }
            sampling = SamplingSettings(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p)
            reply = chat_generate(model, tokenizer, [req.messages], sampling, seed=req.seed or 0)[0][0]
        return {
            "id": f"chatcmpl-test-{stats['requests']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": "stop" if reply.finished else "length",
                    "logprobs": logprobs,
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": reply.num_tokens, "total_tokens": reply.num_tokens},
        }

    return app, stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(model_name: str, api_key: str, adapter: str | Path | None = None):
    """Run the test server on 127.0.0.1 in a thread (`model_name`, plus a LoRA `adapter`); yields
    (base_url, stats)."""
    import uvicorn

    app, stats = build_app(model_name, api_key, adapter)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1", stats
    finally:
        server.should_exit = True
        thread.join(timeout=10)
