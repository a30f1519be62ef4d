"""The server's own counters, rendered in Prometheus' text format by hand (a few counters and
histograms do not justify another dependency). Thread-safe: requests are counted on the
event loop, generations on the engine thread."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from mlxc.request import Answer
from mlxc.service import Reply
from mlxc.stream import Event, Finished

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/v1/models",
    "/health",
    "/metrics",
)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int, str], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.replies: dict[str, int] = defaultdict(int)  # hit / miss / bypass
        self.shared = 0  # requests that joined an identical generation in flight
        self.refused = 0  # 503s for a full queue: neither hits nor misses (never generated)
        self.fast_hits = 0  # hits answered by the fast path for repeats (server/fastpath.py)
        self.generations: dict[str, int] = defaultdict(int)  # by finish reason
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.last_tokens_per_second = 0.0
        self.in_flight = 0

    def on_reply(self, reply: Reply) -> None:
        with self._lock:
            self.replies[reply.status] += 1
            self.shared += reply.shared
        if reply.generation is not None and not reply.shared:
            reply.generation.add_done_callback(self._on_generation_done)

    def on_fast_hit(self) -> None:
        with self._lock:
            self.fast_hits += 1

    def on_refused(self) -> None:
        with self._lock:
            self.refused += 1

    def _on_generation_done(self, event: Event) -> None:
        with self._lock:
            if not isinstance(event, Finished):
                self.generations["error"] += 1
                return
            answer: Answer = event.answer
            self.generations[answer.finish_reason] += 1
            self.prompt_tokens += answer.usage.prompt_tokens - answer.usage.cached_tokens
            self.completion_tokens += answer.usage.completion_tokens
            if answer.finish_reason != "cancelled" and answer.tokens_per_second:
                self.last_tokens_per_second = answer.tokens_per_second

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def on_request(self, path: str, status: int, cache: str, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        with self._lock:
            self.in_flight -= 1
            self.requests[(route, status, cache)] += 1
            self.latency[(route, cache)].observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "replies": dict(self.replies),
                "shared": self.shared,
                "refused": self.refused,
                "fast_hits": self.fast_hits,
                "generations": dict(self.generations),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "tokens_per_second": round(self.last_tokens_per_second, 2),
                "in_flight": self.in_flight,
            }

    def render(
        self, gauges: dict[str, tuple[str, float]], batch_sizes: dict[int, int] | None = None,
        per_model: dict[str, tuple[str, str, dict[str, float]]] | None = None,
    ) -> str:
        """Prometheus text format 0.0.4; `gauges` adds name -> (help, value) readings,
        `batch_sizes` the engine's decode steps by batch size, `per_model` families labelled
        by model: name -> (kind, help, {model: value})."""
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            head("mlxc_requests_total", "counter", "HTTP requests by route, status and cache.")
            for (route, status, cache), n in sorted(self.requests.items()):
                out.append(
                    f'mlxc_requests_total{{route="{route}",status="{status}",cache="{cache}"}} {n}'
                )
            head("mlxc_cache_total", "counter", "Generation requests by cache outcome.")
            for status, n in sorted(self.replies.items()):
                out.append(f'mlxc_cache_total{{result="{status}"}} {n}')
            head("mlxc_refused_total", "counter",
                 "Generation requests refused with 503 (queue full); not cache misses.")
            out.append(f"mlxc_refused_total {self.refused}")
            head("mlxc_fast_path_hits_total", "counter",
                 "Hits on repeated request bodies answered without routing or parsing.")
            out.append(f"mlxc_fast_path_hits_total {self.fast_hits}")
            head("mlxc_single_flight_joins_total", "counter", "Requests that shared a run.")
            out.append(f"mlxc_single_flight_joins_total {self.shared}")
            head("mlxc_generations_total", "counter", "Engine runs by finish reason.")
            for reason, n in sorted(self.generations.items()):
                out.append(f'mlxc_generations_total{{finish_reason="{reason}"}} {n}')
            head("mlxc_prompt_tokens_total", "counter", "Prompt tokens prefilled by the engine.")
            out.append(f"mlxc_prompt_tokens_total {self.prompt_tokens}")
            head("mlxc_generated_tokens_total", "counter", "Tokens generated by the engine.")
            out.append(f"mlxc_generated_tokens_total {self.completion_tokens}")
            head("mlxc_request_duration_seconds", "histogram", "Time to the last byte.")
            for (route, cache), h in sorted(self.latency.items()):
                labels = f'route="{route}",cache="{cache}"'
                for bound, n in zip(LATENCY_BUCKETS, h.counts, strict=True):
                    out.append(
                        f'mlxc_request_duration_seconds_bucket{{{labels},le="{bound}"}} {n}'
                    )
                out.append(f'mlxc_request_duration_seconds_bucket{{{labels},le="+Inf"}} {h.n}')
                out.append(f"mlxc_request_duration_seconds_sum{{{labels}}} {h.total:.6f}")
                out.append(f"mlxc_request_duration_seconds_count{{{labels}}} {h.n}")
            gauges = {
                "mlxc_decode_tokens_per_second": (
                    "Decode speed of the last finished generation.",
                    self.last_tokens_per_second,
                ),
                "mlxc_requests_in_flight": ("Requests being answered.", self.in_flight),
                **gauges,
            }
        for name, (text, value) in gauges.items():
            head(name, "gauge", text)
            # Integers whole (byte gauges: `:g` keeps 6 digits), other values as floats.
            out.append(f"{name} {value}" if isinstance(value, int) else f"{name} {value:g}")
        for name, (kind, text, values) in (per_model or {}).items():
            head(name, kind, text)
            for model, value in values.items():
                label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                out.append(f'{name}{{model="{label}"}} {value:g}')
        if batch_sizes is not None:
            head("mlxc_batch_size", "histogram", "Sequences decoded together, per decode step.")
            count = total = 0
            for size in range(1, max(batch_sizes, default=0) + 1):
                count += batch_sizes.get(size, 0)
                total += size * batch_sizes.get(size, 0)
                out.append(f'mlxc_batch_size_bucket{{le="{size}"}} {count}')
            out.append(f'mlxc_batch_size_bucket{{le="+Inf"}} {count}')
            out.append(f"mlxc_batch_size_sum {total}")
            out.append(f"mlxc_batch_size_count {count}")
        return "\n".join(out) + "\n"
