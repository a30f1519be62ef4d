"""A small client for any OpenAI-compatible server (`mlxc serve`, mlx_lm.server, vLLM, …),
shared by `mlxc cache warm --url` and `mlxc bench --url`: it checks the server once, then
streams chat completions and notes when each piece of text arrived.

Every failure a user can fix (nothing listening, not an OpenAI API, a refused request) is a
`RemoteError` with one line saying what happened. httpx is imported only when used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlxc.errors import InputError
from mlxc.request import GenerationRequest


class RemoteError(InputError):
    """The server could not be reached, is not OpenAI-compatible, or refused a request."""


@dataclass
class Streamed:
    """One streamed chat completion, with the arrival time of each piece of text."""

    text: str = ""
    cache: str = "unknown"  # X-Mlxc-Cache (hit | miss | bypass) when the server sends it
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    started: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    ended: float = 0.0


def chat_body(request: GenerationRequest, model: str | None = None) -> dict[str, Any]:
    """A request as an OpenAI chat completion body, every field spelled out, so the server
    fills in no default of its own and keys it exactly as this process would."""
    body = request.model_dump(mode="json", exclude_none=True)
    body.pop("prompt", None)
    if not body.get("echo"):
        body.pop("echo", None)  # a completions parameter: chat refuses it (messages can't echo)
    body["messages"] = [m.model_dump(mode="json", exclude_none=True) for m in request.messages]
    if model:
        body["model"] = model
    return body


def base_url(url: str) -> str:
    """'localhost:8081', 'http://h:8081/' and 'http://h:8081/v1' all mean http://h:8081/v1."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


class RemoteClient:
    """Thread-safe (httpx.Client is); one per command run. Use as a context manager."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        import httpx

        self.url = base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Connecting is quick or hopeless; a long generation may take minutes to finish.
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0)
        )
        self._httpx = httpx

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _unreachable(self, exc: Exception) -> RemoteError:
        if isinstance(exc, self._httpx.TimeoutException):
            return RemoteError(f"{self.url} did not answer in time ({type(exc).__name__})")
        reason = str(exc) or type(exc).__name__
        return RemoteError(f"cannot reach {self.url}: {reason}. Is the server running?")

    def check(self) -> list[str]:
        """The served model ids; raises RemoteError unless this is an OpenAI-style API."""
        try:
            response = self._http.get("/models", timeout=10.0)
        except self._httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code in (401, 403):
            raise RemoteError(
                f"{self.url} wants an API key: pass --api-key or set MLXC_API_KEY"
            )
        try:
            data = response.json()["data"]
            return [str(item["id"]) for item in data]
        except (ValueError, KeyError, TypeError):
            raise RemoteError(
                f"{self.url} is not an OpenAI-compatible server: GET /v1/models answered "
                f"HTTP {response.status_code} without a model list"
            ) from None

    def chat(
        self,
        payload: dict[str, Any],
        on_text: Callable[[str], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Streamed:
        """Stream one /v1/chat/completions request to its end; closing early (Ctrl-C)
        disconnects, which a server like `mlxc serve` takes as a cancel."""
        body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        result = Streamed(started=time.perf_counter())
        try:
            with self._http.stream(
                "POST", "/chat/completions", json=body, headers=headers
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise RemoteError(_refusal(response))
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    raise RemoteError(
                        f"{self.url} is not an OpenAI-compatible server: a streamed chat "
                        "completion did not answer with server-sent events"
                    )
                result.cache = response.headers.get("x-mlxc-cache", "unknown")
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        _take(json.loads(data), result, on_text)
        except self._httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        except ValueError as exc:  # bad JSON in a chunk
            raise RemoteError(f"{self.url} sent a chunk that is not JSON: {exc}") from None
        result.ended = time.perf_counter()
        return result


def _take(chunk: dict[str, Any], result: Streamed, on_text: Callable[[str], None] | None):
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise RemoteError(f"the server failed mid-stream: {message}")
    for choice in chunk.get("choices") or []:
        text = (choice.get("delta") or {}).get("content")
        if text:
            result.chunk_times.append(time.perf_counter())
            result.text += text
            if on_text is not None:
                on_text(text)
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    if usage := chunk.get("usage"):
        result.prompt_tokens = usage.get("prompt_tokens")
        result.completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = details.get("cached_tokens")


def _refusal(response: Any) -> str:
    """The server's own error message when it gives one (OpenAI's {"error": {...}} shape)."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    if response.status_code == 404 and not message:
        return "the server has no /v1/chat/completions route: is it OpenAI-compatible?"
    return f"the server refused the request (HTTP {response.status_code}): " + (
        message or response.text[:200].strip() or "no reason given"
    )
