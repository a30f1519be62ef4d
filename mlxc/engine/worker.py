"""The engine: ONE thread owns the model, because MLX must not be driven from two threads.

Callers `submit` a request and get a `Generation` at once; the thread runs every admitted
request in one continuous batch (batch/scheduler.py), publishing each piece of text as it comes, so
the event loop and the Rich display never wait on MLX. Anything else that must touch MLX
(counting tokens, prefix warm-up) goes through `call`, which runs a function on the same
thread between decode steps. When nothing waits, the thread may use the pause after an answer
to prefill the next turn's opening (`mlxc serve` asks for that).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from mlxc.config import Settings
from mlxc.engine.batch.limits import (
    DEFAULT_MAX_QUEUE,
    RETRY_AFTER_SECONDS,
    default_max_batch,
)
from mlxc.engine.decode.tools import answer_filter, prompt_messages
from mlxc.errors import (
    EngineBusy,
    ModelError,
    PromptTooLong,  # noqa: F401  (re-exported for front ends)
)
from mlxc.model.refs import ModelRef, model_fingerprint
from mlxc.request import Answer, GenerationRequest, Usage
from mlxc.stream import Failed, Generation

DEFAULT_PREFILL_STEP = 512
log = logging.getLogger("mlxc.prefix")
IDLE_GRACE_SECONDS = 0.2  # longer than a client's back-to-back calls, shorter than reading
# Once a request comes, an idle engine waits a sliver of a lone prefill for others sent with
# it, to prefill them together: on this CPU 4 clients sent at once had first tokens after
# 0.2/1.06/1.06/1.06 s with the first prefilled alone, 0.61 s each together.
COMPANY_WAIT_SHARE, COMPANY_WAIT_MAX = 0.02, 0.005  # of that prefill's time; at most (s)


class Engine:
    """Loads a model on its own thread and runs generations together in one batch."""

    def __init__(
        self,
        ref: ModelRef,
        settings: Settings,
        progress: Callable[[str], None] | None = None,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
        max_batch: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_kv_memory: int | None = None,
    ) -> None:
        self.ref = ref
        self.settings = settings
        self.prefill_step_size = prefill_step_size
        self.max_batch = max(1, max_batch or default_max_batch(ref, settings))
        self.max_queue = max(0, max_queue)
        self.max_kv_memory = max_kv_memory  # bytes; None: from the device (batch/admission.py)
        self.memory: Any = None  # the MemoryGate, once the model is loaded
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
        self.scheduler: Any = None  # made on the engine thread once the model is loaded
        self._stopping = False
        # Generations and calls not ended yet, for `fail` (weak: an ended one just goes).
        self._live: weakref.WeakSet = weakref.WeakSet()
        self._live_lock = threading.Lock()
        self._failed: Exception | None = None

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
    def waiting(self) -> int:
        """Requests not yet admitted to the batch."""
        scheduler = self.scheduler
        return self._jobs.qsize() + (len(scheduler.waiting) if scheduler else 0)

    @property
    def running(self) -> int:
        """Sequences being prefilled or decoded."""
        scheduler = self.scheduler
        return scheduler.active if scheduler else 0

    @property
    def queue_depth(self) -> int:
        return self.waiting + self.running

    @property
    def busy(self) -> bool:
        return self.queue_depth > 0

    def figures(self) -> dict[str, Any]:
        """Batch figures for /health and /metrics (plain numbers, any thread)."""
        from mlxc.engine.batch.figures import engine_figures

        return engine_figures(self)

    def submit(self, request: GenerationRequest) -> Generation:
        """Queue a generation; its events arrive on the returned Generation. Raises
        EngineBusy when `max_queue` requests already wait for a place in the batch."""
        if self.waiting >= self.max_queue + max(0, self.max_batch - self.running):
            raise EngineBusy(
                f"the server is busy: {self.running} sequences running and {self.waiting} "
                "waiting; retry shortly",
                retry_after=RETRY_AFTER_SECONDS,
            )
        if self._failed is not None:
            raise self._failed
        generation = Generation()
        with self._live_lock:
            self._live.add(generation)
        self._idle.clear()
        self._jobs.put((request, generation))
        return generation

    def call(self, fn: Callable[[Engine], Any]) -> Future:
        """Run fn(engine) on the engine thread (for anything that touches MLX)."""
        future: Future = Future()
        if self._failed is not None:
            future.set_exception(self._failed)
            return future
        with self._live_lock:
            self._live.add(future)
        self._idle.clear()
        self._jobs.put((fn, future))
        return future

    def fail(self, error: Exception) -> list[Generation]:
        """The model is gone for good (a sharded model lost a rank): from any thread, even
        while the engine thread is stuck in a model call, every request and call not ended
        gets `error`, so does every later one, and /health says error. Returns the
        generations failed (their streams then end with the error)."""
        with self._live_lock:
            self._failed = self._load_error = error
            pending = list(self._live)
        for sink in pending:
            if isinstance(sink, Future):
                try:
                    sink.set_exception(error)
                except InvalidStateError:  # it had ended
                    pass
            else:
                sink.publish(Failed(error))
        return [sink for sink in pending if isinstance(sink, Generation)]

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
            if self.prompt_cache is not None:  # made before the failure: its writer stops
                self.prompt_cache.close()
            self._let_go()  # what loaded before the failure
            traceback.clear_frames(exc.__traceback__)  # its frames' locals hold the weights
        finally:
            self._loaded.set()
        while self._serve_jobs():
            if self.scheduler is None:  # the model did not load: jobs were answered
                continue
            try:
                self.scheduler.tick()
            except Exception as exc:  # fail what runs, keep serving: never a dead thread
                if self._failed is None:  # else a consequence of the failure, already told
                    log.exception("engine step failed")
                self.scheduler.cancel_all(exc)
        if self.prompt_cache is not None:
            self.prompt_cache.close()
        self._let_go()
        self._stopped.set()
        self._idle.set()
        # Park rather than return: when a thread that ran MLX ends, MLX's thread-local
        # destructors take the GIL, which aborts the process ("terminate called without an
        # active exception") if the interpreter is finalizing at that moment. A parked daemon
        # thread just disappears with the process.
        threading.Event().wait()

    def _let_go(self) -> None:
        """Drop the model, its batch and caches: the parked thread keeps this engine alive,
        and nothing runs on it any more (its figures read None as zero)."""
        self.model = self.batch_model = self.batch_kernels = self.draft = None
        self.scheduler = self.memory = self.prompt_cache = None

    def _serve_jobs(self) -> bool:
        """Take the queued jobs (waiting for one when the batch is empty); False to stop."""
        scheduler = self.scheduler
        if scheduler is None or not scheduler.busy:
            if self._stopping:
                return False
            self._take(self._next_job())
            if scheduler is not None:  # a sliver of time for requests sent with it
                wait = min(COMPANY_WAIT_MAX, COMPANY_WAIT_SHARE * scheduler.lone_prefill)
                deadline = time.monotonic() + wait
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        self._take(self._jobs.get(timeout=left))
                    except queue.Empty:
                        break
        self._collect()
        return True

    def _collect(self) -> None:
        """The jobs queued since the last look, taken without waiting: the scheduler calls
        this as it admits requests, so those sent together start together."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            self._take(job)

    def _take(self, job: Any) -> None:
        """A queued job: a request for the scheduler, a call run now, or None to stop."""
        if job is None:
            self._stopping = True
            return
        work, sink = job
        scheduler = self.scheduler
        if scheduler is not None:
            scheduler.next_turns.clear()  # their states may be taken: never past a job
        if isinstance(sink, Future):
            self._run_call(work, sink)
        elif self._load_error is not None:
            sink.publish(Failed(self._load_error))
        else:
            scheduler.add(work, sink)

    def _next_job(self) -> Any:
        """The next job, once the batch is empty. An answer's idle work waits a moment first:
        a request that comes at once (a client's next call, not a person reading) goes ahead
        of it and cancels it."""
        turns = self.scheduler.next_turns if self.scheduler else []
        while turns:
            try:
                return self._jobs.get(timeout=IDLE_GRACE_SECONDS)
            except queue.Empty:
                self._prefill_next_turn(turns.pop())
        if self._jobs.empty():
            self._idle.set()
        return self._jobs.get()

    def _load(self) -> None:
        from mlxc.engine.load import load_for_engine

        loaded = load_for_engine(self.ref, self.settings, self._progress)
        self.model, self.tokenizer, self.dtype = loaded.model, loaded.tokenizer, loaded.dtype
        self.batch_model, self.batch_kernels = loaded.batch_model, loaded.batch_kernels
        self.last_only, self.context_length = loaded.last_only, loaded.context_length
        self.draft = loaded.draft  # --draft-model's DraftModel, or None
        from mlxc.distributed import serving
        from mlxc.engine.kv.cache import PrefixCache

        fingerprint = model_fingerprint(self.ref, self.settings)
        # Sharded: every rank does rank 0's fetches and stores on its own blocks.
        make = serving.leading_prefix if serving.ROLE is not None else PrefixCache
        self.prompt_cache = make(
            self.model, self.tokenizer, fingerprint, self.settings, self.prefill_step_size,
        )
        from mlxc.engine.batch.admission import MemoryGate, measurement_file

        remembered = fingerprint and measurement_file(
            self.settings.cache_dir / "measured", fingerprint, self.prefill_step_size)
        self.memory = MemoryGate.for_model(self.model, self.prefill_step_size,
                                           self.max_kv_memory, self.prompt_cache, remembered)
        from mlxc.engine.batch.scheduler import Scheduler

        self.scheduler = Scheduler(self, self.max_batch, self._start_sequence, self._collect)

    def _run_call(self, fn: Callable[[Engine], Any], future: Future) -> None:
        if self._load_error is not None:
            if not future.done():
                future.set_exception(self._load_error)
            return
        try:
            result, error = fn(self), None
        except Exception as exc:
            result, error = None, exc
        if future.done():  # `fail` ended it meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def warm_up(self) -> None:
        """Compile what the first client would otherwise wait for (engine thread); on a
        sharded model every rank runs it (its calls and batch are mirrored)."""
        from mlxc.engine.warmup import warm_up

        warm_up(self)

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

    def _prefill_next_turn(self, turn: Any) -> None:
        """Once idle after an answer, feed the template's opening of the next user turn (and
        the answer's last tokens, if the state stops short of them), so a follow-up prefills
        only its own text. A guess: a different next turn trims it off again."""
        from mlxc.engine.kv.turns import next_turn_opening

        try:
            opening = next_turn_opening(self.tokenizer, turn.request, turn.text, turn.said)
            full = turn.said + opening
            if opening and full[: len(turn.kept)] == turn.kept and len(full) > len(turn.kept):
                self.prompt_cache.extend(turn.kept, full[len(turn.kept) :], turn.cache)
        except Exception as exc:  # an optimisation: never worth a dead engine
            log.warning("prefix cache: cannot prefill the next turn's opening (%s)", exc)

    def _start_sequence(self, request: GenerationRequest, generation: Generation) -> Any:
        """A request's sequence: prompt encoded, prefix state fetched, sampler built; or the
        whole Answer of a request that generates nothing (echo with max_tokens 0)."""
        from mlxc.engine.batch.sequence import Sequence
        from mlxc.engine.decode.generate import Prefill
        from mlxc.engine.decode.sampling import build_sampling

        tokens = self.encode(request)
        if self.context_length and len(tokens) + 1 > self.context_length:
            raise PromptTooLong(
                f"the prompt is {len(tokens)} tokens; {self.ref.name} takes at most "
                f"{self.context_length}. Shorten it."
            )
        # Room for its KV cache, or it waits (MemoryWait) or is refused (NotEnoughMemory).
        self.memory.admit(generation, len(tokens), request.max_tokens)
        started = time.perf_counter()  # a state loaded from disk counts in the time to first token
        echoed = None
        if request.echo:
            from mlxc.engine.decode.scoring import prompt_logprobs

            echoed = prompt_logprobs(self.model, self.tokenizer, tokens, request.top_logprobs)
            if request.max_tokens == 0:  # a log-likelihood request: nothing to generate
                return Answer(text="", finish_reason="length", prompt_logprobs=echoed,
                              usage=Usage(prompt_tokens=len(tokens)), model=self.ref.name,
                              prefill_seconds=time.perf_counter() - started)
        cache, todo = self.prompt_cache.fetch(tokens, request)
        reused = len(tokens) - len(todo)
        generation.prompt_tokens_total = len(todo)
        generation.prompt_tokens, generation.reused_tokens = len(tokens), reused
        report = self.prompt_cache.last_report
        if report is not None:  # why it reused that much (kv/divergence.py); resolved later
            report.attach(self.tokenizer, request, tokens)
            generation.prefix = report
        sampling = build_sampling(request, self.tokenizer)
        return Sequence(
            request=request,
            generation=generation,
            prompt=tokens,
            reused=reused,
            cached=self.prompt_cache.last_reused,
            sampling=sampling,
            stops=answer_filter(request, self.tokenizer),
            detokenizer=self.tokenizer.detokenizer,
            eos=set(self.tokenizer.eos_token_ids),
            prefill=Prefill(
                self.model, tokens, reused, cache, sampling.sampler, sampling.processors,
                self.prefill_step_size, self.last_only,
            ),
            cache=cache,
            started=started,
            prompt_logprobs=echoed,
            speculate=self.settings.speculate,
            prediction=self.tokenizer.encode(request.prediction, add_special_tokens=False)
            if request.prediction else None,
        )
