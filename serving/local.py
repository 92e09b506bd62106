"""Run the server in a background thread of this process, and make stand-in adapters for it (tests,
benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from .service import MemPromptService, ServeSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """`with ServerThread(settings) as srv: srv.url` — uvicorn on 127.0.0.1, stopped on exit."""

    def __init__(
        self,
        settings: ServeSettings,
        service: MemPromptService | None = None,
        port: int | None = None,
        startup_timeout: float = 300,
    ):
        import uvicorn

        from .app import build_app

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = startup_timeout
        config = uvicorn.Config(build_app(settings, service), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        import httpx

        self.thread.start()
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("server thread exited during startup (see the log above)")
            try:
                if httpx.get(self.url + "/health", timeout=1).json().get("status") == "ok":
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not start within {self.timeout}s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def random_lora_adapter(dest: Path, seed: int, model: str = "tiny", rank: int = 4) -> Path:
    """A PEFT LoRA folder on `model` with random non-zero B (PEFT's default init would change nothing),
    so replies visibly differ by version: a stand-in for a trained adapter in deploy tests and benchmarks.
    On every linear layer, B ~ N(0, 1): on `tiny` (random, tied embeddings) the residual stream is then
    moved by the context enough that greedy replies differ from prompt to prompt and token to token;
    an adapter on q/v alone left each reply one token repeated, the same for every chat prompt."""
    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.models import device_policy, load_causal_lm

    base = load_causal_lm(model, device_policy("cpu"))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(seed)  # before the wrap: init_lora_weights=False draws A from the global generator too
    peft = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    peft.save_pretrained(str(dest))
    return dest
