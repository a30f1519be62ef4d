"""Cache hits are looked up on the server's own two hit threads, never in the shared worker
pool: there a first request waits for its model to load (minutes for a 30B model) and, under
many clients, the pool's threads convoyed on the store's lock and the GIL (issue 30, point 7).
"""

from __future__ import annotations

import asyncio
import threading

import anyio.to_thread
import httpx

from mlxc.config import Settings
from mlxc.server.app import create_app
from mlxc.server.state import ServerOptions
from mlxc.service import Service

QUESTION = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6,
            "temperature": 0}


def test_a_hit_is_answered_while_every_thread_of_the_shared_pool_is_taken(tmp_path, tiny_model):
    service = Service(Settings(model=str(tiny_model), cache_dir=tmp_path / "cache",
                               models_dir=tmp_path / "models"))
    app = create_app(service, ServerOptions())
    release = threading.Event()

    async def run() -> tuple[httpx.Response, httpx.Response, bool]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",
                                     timeout=120) as client:
            first = await client.post("/v1/chat/completions", json=QUESTION)
            # The shared pool shrunk to one thread, and that one held (as by a request
            # waiting for a model to load): only the hit threads are left.
            anyio.to_thread.current_default_thread_limiter().total_tokens = 1
            holder = asyncio.create_task(anyio.to_thread.run_sync(release.wait))
            await asyncio.sleep(0.05)
            new_question = asyncio.create_task(client.post("/v1/chat/completions", json={
                **QUESTION, "messages": [{"role": "user", "content": "Name a fruit."}]}))
            try:
                repeat = await asyncio.wait_for(
                    client.post("/v1/chat/completions", json=QUESTION), timeout=30)
                waiting = not new_question.done()  # a miss needs the shared pool: it waits
            finally:
                release.set()
                await holder
            await new_question
            return first, repeat, waiting

    try:
        first, repeat, miss_waited = asyncio.run(run())
    finally:
        service.close()
    assert first.headers["x-mlxc-cache"] == "miss"
    assert repeat.headers["x-mlxc-cache"] == "hit"
    assert repeat.json()["choices"] == first.json()["choices"]  # exactly what generation gave
    assert miss_waited
    stats = service.store.stats()
    assert (stats.hits, stats.misses) == (1, 2)


def test_hit_prepares_nothing_and_honours_no_cache(tmp_path, tiny_model):
    from mlxc.request import GenerationRequest

    service = Service(Settings(model=str(tiny_model), cache_dir=tmp_path / "cache",
                               models_dir=tmp_path / "models"))
    request = GenerationRequest(messages=[{"role": "user", "content": "Hi."}], max_tokens=4,
                                temperature=0.0)
    try:
        assert service.hit(request) is None  # the model not prepared: no work done here
        assert not service.engine_started
        reply = service.start(request)
        answer = reply.generation.result()
        assert service.hit(request, read=False) is None  # Cache-Control: no-cache
        hit = service.hit(request)
        assert hit is not None and hit.status == "hit" and hit.answer.text == answer.text
    finally:
        service.close()
