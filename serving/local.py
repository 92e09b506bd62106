"""Run the server in a background thread of this process (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

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
