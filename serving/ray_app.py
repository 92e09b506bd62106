"""The same app as a Ray Serve deployment, for `heedful serve --ray-address ADDR`.

Each replica builds its own model and index from the shared memory file; indexes follow
rows written by other replicas through `Retriever.sync` (new ids are picked up before
each lookup), and SQLite's WAL keeps concurrent writers safe as long as the replicas
share a local filesystem (one node, or a node-pinned deployment).
"""

from __future__ import annotations

from ray import serve

from serving.service import ServeSettings


@serve.ingress()
class HeedfulServe:
    """Ray Serve replica: the FastAPI app is built at replica start from the settings (JSON)."""

    def __init__(self, settings_json: str):
        self.settings = ServeSettings.model_validate_json(settings_json)

    def __serve_build_asgi_app__(self):
        from serving.app import build_app
        from serving.service import MemPromptService

        return build_app(self.settings, MemPromptService(self.settings))


def application(settings: ServeSettings, replicas: int = 1, num_cpus: float = 1.0):
    # the decorator form: same Deployment, and ray's annotation covers it
    dep = serve.deployment(name="heedful", num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus})(HeedfulServe)
    if replicas > 1:  # an admin deploy would reach one replica only: mixed versions behind one URL
        settings = settings.model_copy(update={"hot_swap": False})
    return dep.bind(settings.model_dump_json())


def deploy(settings: ServeSettings, address: str, host: str, port: int, replicas: int = 1) -> None:
    """Connect to the cluster, start Serve's HTTP proxy on host:port, run until interrupted."""
    from pipeline.cluster import connect

    connect(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(settings, replicas), name="heedful", route_prefix="/", blocking=True)
