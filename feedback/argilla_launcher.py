"""Start argilla-server 2.8 in ONE process: osmem search engine, migrations, owner, uvicorn.

Runs inside the server's own virtualenv (`.venv-argilla`: argilla-server pins old pydantic,
typer and urllib3), so it imports nothing from heedful. `feedback/argilla_stack.py` starts it
with the ARGILLA_* environment (SQLite, Redis, `ARGILLA_SEARCH_ENGINE=osmem`).

Why one process: every server CLI call (`database migrate`, `users create`, `start`) pays
~5 s of imports; doing all three here brings the API up in about as long as one of them.

Why an `osmem` engine: osmem-server (the in-memory OpenSearch) refuses scripted `_update`
calls and `knn` queries. argilla-server uses scripts when a response is created, updated or
deleted and when a suggestion is deleted, and knn for "find similar". The subclass below
does those with plain get / index calls (read-modify-write under a per-document lock) and
cosine similarity over the filtered candidates, registered through the server's own
`SearchEngine.register`, so no installed file is touched.

Secrets never travel on the command line (world-readable in /proc): the owner's name,
password and API key are read from a 0600 JSON file given by path.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from typing import Any
from uuid import UUID

LOG = logging.getLogger("heedful.argilla")


def register_osmem_engine():
    """Define and register the `osmem` engine (a subclass of the server's OpenSearchEngine)."""
    from argilla_server.search_engine import SearchEngine
    from argilla_server.search_engine.commons import (
        es_bool_query,
        es_exists_field_query,
        es_field_for_vector_settings,
        es_ids_query,
        es_index_name_for_dataset,
    )
    from argilla_server.search_engine.opensearch import OpenSearchEngine

    locks: dict[tuple, asyncio.Lock] = defaultdict(asyncio.Lock)

    @SearchEngine.register(engine_name="osmem")
    @dataclasses.dataclass
    class OsmemSearchEngine(OpenSearchEngine):
        """OpenSearchEngine without painless scripts and knn (osmem implements neither)."""

        # one engine instance per request: the locks live at module level
        async def _rewrite(self, index: str, doc_id: str, change) -> None:
            async with locks[(index, doc_id)]:
                found = await self.client.get(index=index, id=doc_id)
                source = found["_source"]
                change(source)
                await self.client.index(index=index, id=doc_id, body=source, refresh=True)

        async def partial_record_update(self, record, **update):
            index = es_index_name_for_dataset(record.dataset)
            async with locks[(index, str(record.id))]:
                await self._update_document_request(index_name=index, id=str(record.id), body={"doc": update})

        async def update_record_response(self, response) -> None:
            index = es_index_name_for_dataset(response.record.dataset)
            new = _jsonable(self._map_record_response_to_es(response))

            def change(source):
                kept = [r for r in (source.get("responses") or []) if str(r.get("id")) != new["id"]]
                source["responses"] = kept + [new]

            await self._rewrite(index, str(response.record.id), change)

        async def delete_record_response(self, response) -> None:
            index = es_index_name_for_dataset(response.record.dataset)
            gone = str(response.id)

            def change(source):
                if source.get("responses") is not None:
                    source["responses"] = [r for r in source["responses"] if str(r.get("id")) != gone]

            await self._rewrite(index, str(response.record.id), change)

        async def delete_record_suggestion(self, suggestion) -> None:
            index = es_index_name_for_dataset(suggestion.record.dataset)
            name = suggestion.question.name

            def change(source):
                (source.get("suggestions") or {}).pop(name, None)

            await self._rewrite(index, str(suggestion.record_id), change)

        async def _request_similarity_search(
            self,
            index: str,
            vector_settings,
            value: list[float],
            k: int,
            excluded_id: UUID | None = None,
            query_filters: list[dict] | None = None,
        ) -> dict:
            """Exact cosine similarity over every candidate that passes the filters.

            Scores follow OpenSearch's lucene `cosinesimil`: (1 + cos) / 2, so the UI's
            thresholds mean the same as on a real cluster."""
            field = es_field_for_vector_settings(vector_settings)
            query = es_bool_query(
                must=[es_exists_field_query(field)] + list(query_filters or []),
                must_not=[es_ids_query([str(excluded_id)])] if excluded_id else None,
            )
            norm = math.sqrt(sum(v * v for v in value)) or 1.0
            scored, offset, page = [], 0, 500
            while True:
                res = await self.client.search(index=index, body={"query": query, "_source": [field]}, from_=offset, size=page)
                hits = res["hits"]["hits"]
                for hit in hits:
                    vector = _dig(hit.get("_source", {}), field)
                    if not vector:
                        continue
                    dot = sum(a * b for a, b in zip(value, vector))
                    other = math.sqrt(sum(b * b for b in vector)) or 1.0
                    scored.append(((1.0 + dot / (norm * other)) / 2.0, hit["_id"]))
                offset += len(hits)
                if len(hits) < page:
                    break
            scored.sort(key=lambda s: -s[0])
            top = scored[:k]
            return {
                "hits": {
                    "total": {"value": len(top), "relation": "eq"},
                    "hits": [{"_id": doc_id, "_score": score} for score, doc_id in top],
                }
            }

    return OsmemSearchEngine


def reuse_settings_validators() -> None:
    """Build the pydantic validators of question and metadata settings once, not per call.

    argilla-server 2.8's `Question.parsed_settings` and `MetadataProperty.parsed_settings`
    construct a `TypeAdapter` (a schema compile) on every access, and a bulk upsert reads them
    for every record and question: importing qa-feedback (2,800 records) spent about a quarter
    of the server's CPU there. A `TypeAdapter` holds no state between calls, so one per settings
    type validates exactly as a fresh one does. Attributes replaced at run time: no installed
    file is touched."""
    from argilla_server.models.database import MetadataProperty, MetadataPropertySettings, Question, QuestionSettings
    from pydantic import TypeAdapter

    questions, metadata = TypeAdapter(QuestionSettings), TypeAdapter(MetadataPropertySettings)
    Question.parsed_settings = property(lambda self: questions.validate_python(self.settings))
    MetadataProperty.parsed_settings = property(lambda self: metadata.validate_python(self.settings))


def _dig(source: dict, dotted: str):
    node: Any = source
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, UUID):
        return str(value)
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums
        return value.value
    return value


def migrate() -> None:
    from alembic.config import main as alembic_main
    from argilla_server.database import ALEMBIC_CONFIG_FILE

    alembic_main(argv=["-c", ALEMBIC_CONFIG_FILE, "upgrade", "head"])


async def ensure_owner(secrets: dict) -> None:
    """Create the owner (or bring its password/API key in line with the secrets file)."""
    from argilla_server.contexts import accounts
    from argilla_server.database import AsyncSessionLocal
    from argilla_server.models import User, UserRole

    owner = secrets["owner"]
    async with AsyncSessionLocal() as db:
        user = await accounts.get_user_by_username(db, owner["username"])
        if user is None:
            await User.create(
                db,
                first_name=owner["username"],
                username=owner["username"],
                role=UserRole.owner,
                password_hash=accounts.hash_password(owner["password"]),
                api_key=owner["api_key"],
            )
            LOG.info("created owner %r", owner["username"])
        elif user.api_key != owner["api_key"] or not accounts.verify_password(owner["password"], user.password_hash):
            await user.update(db, api_key=owner["api_key"], password_hash=accounts.hash_password(owner["password"]))


async def reindex_all() -> int:
    """osmem keeps its index in memory: rebuild every dataset's index from SQLite at start."""
    from argilla_server.cli.search_engine.reindex import Reindexer
    from argilla_server.database import AsyncSessionLocal
    from argilla_server.search_engine import get_search_engine

    count = 0
    async with AsyncSessionLocal() as db:
        async for engine in get_search_engine():
            async for dataset in Reindexer.reindex_datasets(db, engine):
                async for records in Reindexer.reindex_dataset_records(db, engine, dataset):
                    count += len(records)
    return count


async def wait_for_search_engine(timeout: float = 30.0) -> None:
    from argilla_server.search_engine import get_search_engine

    deadline = time.time() + timeout
    while True:
        try:
            async for engine in get_search_engine():
                if await engine.ping():
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.time() > deadline:
            raise SystemExit(f"search engine at {os.environ.get('ARGILLA_ELASTICSEARCH')} did not answer in {timeout}s")
        await asyncio.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secrets", required=True, help="0600 JSON file with the owner's credentials")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("ARGILLA_SEARCH_ENGINE", "osmem")
    os.umask(0o077)  # the SQLite file holds API keys and password hashes
    started = time.time()

    with open(args.secrets, encoding="utf-8") as fh:
        secrets = json.load(fh)
    register_osmem_engine()
    reuse_settings_validators()
    migrate()
    logging.getLogger().setLevel(logging.INFO)  # alembic's fileConfig lowers it and disables loggers
    LOG.disabled = False
    LOG.info("migrations done in %.1fs", time.time() - started)

    async def prepare():
        await ensure_owner(secrets)
        await wait_for_search_engine()
        return await reindex_all()

    reindexed = asyncio.run(prepare())
    LOG.info("owner ready, %d records reindexed, %.1fs after start", reindexed, time.time() - started)

    import uvicorn
    from argilla_server._app import app

    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
