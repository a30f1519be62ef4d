"""The engine: ONE thread owns the model, because MLX must not be driven from two threads.

Callers `submit` a request and get a `Generation` at once; the thread prefills, decodes and
publishes each piece of text as it comes, so the event loop and the Rich display never wait
on MLX. Anything else that must touch MLX (counting tokens, prefix warm-up) goes through
`call`, which runs a function on the same thread. When nothing waits, the thread may use the
pause after an answer to prefill the next turn's opening (`mlxc serve` asks for that).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from mlxc.config import Settings
from mlxc.engine.tools import answer_filter, prompt_messages
from mlxc.errors import (
    ModelError,
    PromptTooLong,  # noqa: F401  (re-exported for front ends)
)
from mlxc.model.quiet import quiet_libraries
from mlxc.model.refs import ModelRef, model_fingerprint, prepare_model
from mlxc.request import Answer, GenerationRequest, Usage
from mlxc.stream import Delta, Failed, Finished, Generation

DEFAULT_PREFILL_STEP = 512
log = logging.getLogger("mlxc.prefix")
IDLE_GRACE_SECONDS = 0.2  # longer than a client's back-to-back calls, shorter than reading


class Engine:
    """Loads a model on its own thread and runs generations one after another."""

    def __init__(
        self,
        ref: ModelRef,
        settings: Settings,
        progress: Callable[[str], None] | None = None,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
    ) -> None:
        self.ref = ref
        self.settings = settings
        self.prefill_step_size = prefill_step_size
        self._progress = progress or (lambda _msg: None)
        self._jobs: queue.Queue = queue.Queue()
        self._loaded = threading.Event()
        self._stopped = threading.Event()
        self._idle = threading.Event()
        self._load_error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="mlxc-engine", daemon=True)
        self.model: Any = None
        self.tokenizer: Any = None
        self.prompt_cache: Any = None
        self.context_length = 0
        self.dtype = ""
        self.last_only = False  # the prompt's last chunk can give its last logits alone
        self._next_turn: tuple | None = None  # what _prefill_next_turn extends, if idle
        self.busy = False

    # -- public, any thread ------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def wait_loaded(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; raise the load error if it failed."""
        self._loaded.wait(timeout)
        if self._load_error is not None:
            raise self._load_error

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set() and self._load_error is None

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize() + (1 if self.busy else 0)

    def submit(self, request: GenerationRequest) -> Generation:
        """Queue a generation; its events arrive on the returned Generation."""
        generation = Generation()
        self._idle.clear()
        self._jobs.put((request, generation))
        return generation

    def call(self, fn: Callable[[Engine], Any]) -> Future:
        """Run fn(engine) on the engine thread (for anything that touches MLX)."""
        future: Future = Future()
        self._idle.clear()
        self._jobs.put((fn, future))
        return future

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the engine has nothing queued and its idle work is done (for tests and
        benchmarks that need a settled cache); False on timeout."""
        return self._idle.wait(timeout)

    def shutdown(self, wait: float | None = None) -> None:
        """Stop after the queued jobs; with `wait`, block up to that many seconds until the
        thread is done (its last prefix state written, so MLX is free for another engine)."""
        self._jobs.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._stopped.wait(wait)

    # -- engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:  # reported to every caller, never a silent dead thread
            self._load_error = exc if isinstance(exc, ModelError) else ModelError(str(exc))
        finally:
            self._loaded.set()
        while (job := self._next_job()) is not None:
            work, sink = job
            self.busy = True
            try:
                if isinstance(sink, Future):
                    self._run_call(work, sink)
                else:
                    self._run_generation(work, sink)
            finally:
                self.busy = False
        if self.prompt_cache is not None:
            self.prompt_cache.close()
        self.model = self.prompt_cache = None
        self._stopped.set()
        self._idle.set()
        # Park rather than return: when a thread that ran MLX ends, MLX's thread-local
        # destructors take the GIL, which aborts the process ("terminate called without an
        # active exception") if the interpreter is finalizing at that moment. A parked daemon
        # thread just disappears with the process.
        threading.Event().wait()

    def _next_job(self) -> Any:
        """The next job. An answer's idle work waits a moment first: a request that comes at
        once (a client's next call, not a person reading) goes ahead of it and cancels it."""
        turn, self._next_turn = self._next_turn, None  # it holds a state: never past a job
        if turn is not None:
            try:
                return self._jobs.get(timeout=IDLE_GRACE_SECONDS)
            except queue.Empty:
                self._prefill_next_turn(*turn)
        if self._jobs.empty():
            self._idle.set()
        return self._jobs.get()

    def _load(self) -> None:
        quiet_libraries()
        from mlxc.model.blas import load_optimised_blas

        load_optimised_blas()  # must come before the first `import mlx.core`
        prepare_model(self.ref, self._progress)
        self._progress(f"loading {self.ref.name}")
        try:
            from mlx_lm import load
        except ImportError as exc:
            raise ModelError(
                f"MLX cannot be loaded on this machine ({exc}); cached answers still work, "
                "new ones need `pip install mlx-lm` and mlx (mlx[cpu] on Linux)."
            ) from exc
        from mlxc.model.dtype import apply_dtype, effective_dtype_without_mlx

        self.model, self.tokenizer = load(str(self.ref.folder))
        self.dtype = effective_dtype_without_mlx(self.settings.dtype, self.ref.folder)
        apply_dtype(self.model, self.dtype)
        from mlxc.engine.generate import supports_last_position_logits

        self.last_only = supports_last_position_logits(self.model)
        args = getattr(self.model, "args", None)
        self.context_length = int(getattr(args, "max_position_embeddings", 0) or 0)
        from mlxc.engine.prefix_cache import PrefixCache

        self.prompt_cache = PrefixCache(
            self.model, self.tokenizer, model_fingerprint(self.ref, self.settings),
            self.settings, self.prefill_step_size,
        )

    def _run_call(self, fn: Callable[[Engine], Any], future: Future) -> None:
        if self._load_error is not None:
            future.set_exception(self._load_error)
            return
        try:
            future.set_result(fn(self))
        except Exception as exc:
            future.set_exception(exc)

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt tokens: the chat template for messages, plain text for a raw prompt."""
        if isinstance(request.prompt, list):  # token ids, as lm-eval sends them
            if not all(0 <= t < len(self.tokenizer) for t in request.prompt):
                raise ValueError(f"prompt token ids must be in [0, {len(self.tokenizer)})")
            return list(request.prompt)
        if request.prompt is not None:
            return self.tokenizer.encode(request.prompt)
        messages, tools = prompt_messages(request, self.tokenizer)
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _run_generation(self, request: GenerationRequest, generation: Generation) -> None:
        if self._load_error is not None:
            generation.publish(Failed(self._load_error))
            return
        if generation.cancelled.is_set():
            generation.publish(Finished(Answer(text="", finish_reason="cancelled")))
            return
        try:
            generation.publish(Finished(self._generate(request, generation)))
        except Exception as exc:
            generation.publish(Failed(exc))

    def _prefill_next_turn(
        self, request: GenerationRequest, kept: list[int], said: list[int], answer: str,
        state: list[Any],
    ) -> None:
        """Once idle after an answer, feed the template's opening of the next user turn (and
        the answer's last token, if the state stops short of it), so a follow-up prefills only
        its own text. A guess: a different next turn trims it off again."""
        from mlxc.engine.turns import next_turn_opening

        try:
            if opening := next_turn_opening(self.tokenizer, request, answer, said):
                self.prompt_cache.extend(kept, said[len(kept) :] + opening, state)
        except Exception as exc:  # an optimisation: never worth a dead engine
            log.warning("prefix cache: cannot prefill the next turn's opening (%s)", exc)

    def _generate(self, request: GenerationRequest, generation: Generation) -> Answer:
        import mlx.core as mx

        from mlxc.engine.generate import generate_tokens
        from mlxc.engine.sampling import build_sampling

        tokens = self.encode(request)
        if self.context_length and len(tokens) + 1 > self.context_length:
            raise PromptTooLong(
                f"the prompt is {len(tokens)} tokens; {self.ref.name} takes at most "
                f"{self.context_length}. Shorten it."
            )
        start = time.perf_counter()  # a state loaded from disk counts in the time to first token
        echoed = None
        if request.echo:
            from mlxc.engine.scoring import prompt_logprobs

            echoed = prompt_logprobs(self.model, self.tokenizer, tokens, request.top_logprobs)
            if request.max_tokens == 0:  # a log-likelihood request: nothing to generate
                return Answer(text="", finish_reason="length", prompt_logprobs=echoed,
                              usage=Usage(prompt_tokens=len(tokens)), model=self.ref.name,
                              prefill_seconds=time.perf_counter() - start)
        prompt_cache, todo = self.prompt_cache.fetch(tokens, request)
        reused = len(tokens) - len(todo)
        generation.prompt_tokens_total = len(todo)
        generation.prompt_tokens, generation.reused_tokens = len(tokens), reused

        def on_prefill(done: int, _total: int) -> None:
            generation.prompt_tokens_done = done

        if request.seed is not None:
            mx.random.seed(request.seed)
        sampling = build_sampling(request, self.tokenizer)
        stops = answer_filter(request, self.tokenizer)
        text_parts: list[str] = []
        generated: list[int] = []
        finish = "length"
        first_token_at = None
        for response in generate_tokens(
            self.model,
            self.tokenizer,
            tokens,
            reused,
            prompt_cache,
            sampler=sampling.sampler,
            logits_processors=sampling.processors,
            max_tokens=request.max_tokens,
            prefill_step_size=self.prefill_step_size,
            last_only=self.last_only,
            on_prefill=on_prefill,
        ):
            first_token_at = first_token_at or time.perf_counter()
            if response.finish_reason != "stop":
                generated.append(response.token)
                sampling.observe(response.token, response.logprobs)
            emit, stopped = stops.feed(response.text)
            if emit:
                text_parts.append(emit)
                generation.publish(Delta(emit, sampling.take_logprobs()))
            if stopped:
                finish = "stop"
                break
            if response.finish_reason is not None:
                finish = response.finish_reason
            if generation.cancelled.is_set():
                finish = "cancelled"
                break
        if tail := stops.flush():
            text_parts.append(tail)
            generation.publish(Delta(tail, sampling.take_logprobs()))
        end = time.perf_counter()
        first_token_at = first_token_at or end
        # Kept even when cancelled: the prompt's state is still good for the next request.
        # The state may stop short of the last token (see generate.py): the key is cut to it.
        said = tokens + generated
        kept = self.prompt_cache.store(said, prompt_cache)
        text = "".join(text_parts)
        next_turn = self.settings.next_turn_prefill and finish != "cancelled"
        if kept and next_turn and not stops.tool_calls:  # a user's turn comes next, most likely
            self._next_turn = (request, kept, said, text, prompt_cache)
        return Answer(
            text=text,
            finish_reason=stops.finish_reason(finish),
            stop_sequence=stops.stops.matched,
            tool_calls=stops.tool_calls,
            usage=Usage(
                prompt_tokens=len(tokens),
                completion_tokens=len(generated),
                cached_tokens=self.prompt_cache.last_reused,
            ),
            model=self.ref.name,
            logprobs=sampling.logprobs,
            prompt_logprobs=echoed,
            prefill_seconds=first_token_at - start,
            generation_seconds=end - first_token_at,
        )
