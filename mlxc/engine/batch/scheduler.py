"""Continuous batching on the engine thread: requests join and leave a running batch between
decode steps.

Each `tick` does at most three things, in this order:
1. admit waiting requests while the batch has room (prompt encoded, prefix state fetched),
   and those that arrive while they are admitted (`collect`): clients that send at once
   reach the engine ~1 ms apart, about the time one takes to admit;
2. feed one prompt chunk of the sequence being prefilled, so a long prompt never stalls the
   running streams for its whole prefill; its last chunk samples the first token, which is
   published at once (the lone request's time to first token, prefix shortcuts included).
   While others decode, each chunk waits until they have had their share of the time it is
   expected to take (DECODE_SHARE; at the rate the chunk before it was prefilled): it comes
   before each chunk, so the prompt's last chunk is paid for too and running streams keep
   at least half their speed from the moment it arrives to its first token (batch/pacing.py).
   Requests admitted together (a burst) are prefilled together by the batch, in one pass
   per chunk, and then decode together, as mlx-lm's server does;
3. one decode step: of the sequence that runs alone (batch/lone.py: mlx-lm's own loop, at raw
   speed), or of every running sequence together, by mlx-lm's `BatchGenerator`. Both queue
   step n+1 before they read the tokens of step n (pipelined on both backends). A lone
   sequence moves into the batch when a second one is ready to decode, and the batch's last
   sequence moves back when the others are done.

A request that comes alone is prefilled on its own state exactly as a lone request's would
be; a burst's prompts share a pass (see the README's "Batching" section for what batching
changes).
Engine thread only; `figures()` may be read from any thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mlxc.engine.batch.admission import MemoryWait
from mlxc.engine.batch.figures import Figures
from mlxc.engine.batch.finish import NextTurn, finish
from mlxc.engine.batch.lone import LoneDecoder
from mlxc.engine.batch.pacing import PrefillPacing
from mlxc.engine.batch.sequence import Sequence
from mlxc.engine.batch.speculative import BatchSpeculation
from mlxc.engine.decode.speculate import StepCosts
from mlxc.errors import PromptTooLong
from mlxc.request import Answer, GenerationRequest
from mlxc.stream import Failed, Finished, Generation

log = logging.getLogger("mlxc.engine")
Starter = Callable[[GenerationRequest, Generation], Sequence | Answer]


class Scheduler:
    def __init__(self, engine: Any, max_batch: int, start: Starter,
                 collect: Callable[[], None] = lambda: None) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self._start = start
        self._collect = collect  # moves requests queued since the tick began into `waiting`
        self.batch = self._new_batch()
        self.waiting: deque[tuple[GenerationRequest, Generation]] = deque()
        self.prefilling: Sequence | None = None
        self.running: dict[int, Sequence] = {}  # in the batch, by its uid there
        self.lone: LoneDecoder | None = None  # the sequence that decodes alone, if one does
        self.step_costs = StepCosts()  # this model's plain step and verify pass, measured
        self.speculation = BatchSpeculation(engine.model, self.step_costs)
        self.draft = getattr(engine, "draft", None)  # a DraftModel drafts for the lone loop
        self.ready: list[Sequence] = []  # prefilled in a burst, waiting to join together
        self.next_turns: list[NextTurn] = []
        self.figures = Figures(step_costs=self.step_costs)
        self.pacing = PrefillPacing()
        self.lone_prefill = 0.0  # seconds to the first token of the last prompt run alone

    def _new_batch(self) -> Any:
        from mlx_lm.generate import StopSequences

        from mlxc.engine.batch.generator import Batch

        # Given per sequence (`_insert`): the end tokens, or none with ignore_eos.
        ends = StopSequences([[t] for t in sorted(self.engine.tokenizer.eos_token_ids)])
        self._stop_tokens = {False: ends, True: StopSequences()}
        return Batch(
            self.engine.batch_model,
            completion_batch_size=self.max_batch,
            prefill_batch_size=self.max_batch,  # those that join in one step, together
            prefill_step_size=self.engine.prefill_step_size,
        )

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.lone or self.ready)

    @property
    def decoding(self) -> int:
        return len(self.running) + (self.lone is not None) + len(self.ready)

    @property
    def active(self) -> int:
        """Sequences being prefilled or decoded."""
        return self.decoding + (self.prefilling is not None)

    @property
    def admissible(self) -> bool:
        """Someone waits, and the first in line is not waiting for memory (batch/admission.py)."""
        return bool(self.waiting) and self.engine.memory.lets_in(self.waiting[0])

    def add(self, request: GenerationRequest, generation: Generation) -> None:
        self.waiting.append((request, generation))

    def tick(self) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        with mx.stream(generation_stream):
            self._admit()
            if self.ready and not self.admissible and self.prefilling is None:
                self._release()  # the rest of a burst failed or was cancelled
            decoding = self.lone is not None or self.running
            if self.prefilling is not None and (self.pacing.owed <= 0 or not decoding):
                seq, tokens = self.prefilling, self.prefilling.prefill.next_tokens()
                started = time.perf_counter()
                self._prefill()
                self.pacing.learn(seq, (time.perf_counter() - started) / max(tokens, 1))
                self.pacing.owed = self.pacing.share_before(self.prefilling)
            if self.lone is not None and any(seq.taken for seq in self.running.values()):
                self._join(self._take_lone())  # a burst's prompts are in: decode together
            if self.lone is not None or self.running:
                started = time.perf_counter()
                if self.lone is not None:
                    self._decode_lone()
                if self.running:
                    self._decode()
                self.pacing.owed -= time.perf_counter() - started

    # -- the three steps ---------------------------------------------------------------

    def _admit(self) -> None:
        room = self.max_batch - self.decoding
        if self.prefilling is None and room > 1:
            self._admit_burst(room)
        while self.prefilling is None and self.admissible and self.decoding < self.max_batch:
            self._prefill_next(self._start_next())

    def _prefill_next(self, seq: Sequence | None) -> None:
        """`seq` is the one to prefill chunk by chunk; running streams get their share first."""
        self.prefilling = seq
        self.pacing.owed = self.pacing.share_before(seq)

    def _admit_burst(self, room: int) -> None:
        """Start the waiting requests, and those that come while they are started; several:
        the batch prefills their prompts together (on this 2-core CPU 4 prompts of 42 tokens
        took 0.6 s together, 1.0 s one by one), a chunk per decode step of those already
        running, then they decode together. One: it is prefilled the lone way.
        Starting one (its template, its tokens) takes ~1 ms on the H200's host: clients that
        send together arrive that far apart, and a burst split in two costs a second prompt
        pass and a second first step before the last ones' first tokens (burst_timeline.py)."""
        seqs: list[Sequence] = []
        while len(seqs) < room:
            if not self.waiting:
                self._collect()
            if not self.admissible:
                break
            if (seq := self._start_next()) is not None:
                seqs.append(seq)
        if len(seqs) == 1:
            self._prefill_next(seqs[0])  # the rest failed or left: the lone way
        elif seqs:
            self._insert(seqs, [seq.prompt[seq.reused :] for seq in seqs],
                         [seq.prompt[: seq.reused] for seq in seqs])

    def _start_next(self) -> Sequence | None:
        """The next waiting request as a sequence; None if it needs none (cancelled, failed,
        or answered at once)."""
        request, generation = self.waiting.popleft()
        if generation.cancelled.is_set():
            generation.publish(Finished(Answer(text="", finish_reason="cancelled")))
            return None
        self.next_turns.clear()  # a fetch may take over their states
        try:
            started = self._start(request, generation)
        except MemoryWait:  # it fits once running sequences finish: first in line, it waits
            self.waiting.appendleft((request, generation))
            return None
        except Exception as exc:  # a prompt too long, a template that refuses it
            if not isinstance(exc, PromptTooLong):
                log.debug("cannot start a sequence", exc_info=True)
            generation.publish(Failed(exc))
            return None
        if isinstance(started, Answer):  # nothing to generate (echo, max_tokens 0)
            generation.publish(Finished(started))
            return None
        return started

    def _prefill(self) -> None:
        seq = self.prefilling
        if seq.generation.cancelled.is_set():
            self.prefilling = None
            seq.finish = "cancelled"
            self._finish(seq, seq.cache, seq.prompt[: seq.reused + seq.prefill.done])
            return
        first = seq.prefill.advance()
        seq.generation.prompt_tokens_done = seq.prefill.done
        if first is None:
            return
        self.prefilling = None
        if not (self.running or self.lone):
            self.lone_prefill = time.perf_counter() - seq.started
        token, logprobs = first[0].item(), first[1]
        if seq.take(token, logprobs):  # done at once: the state holds the prompt only
            self._finish(seq, seq.cache, seq.prompt)
            return
        self.ready.append(seq)
        self._collect()  # any that came while it prefilled
        if self.decoding < self.max_batch and self.admissible and not (self.running or self.lone):
            return  # a burst: prefill the others too, then they all join in one step
        self._release()

    def _release(self) -> None:
        """Start the sequences whose prompts are in: one alone decodes on its own, more join
        the batch together (one first step for all of them)."""
        ready, self.ready = self.ready, []
        if len(ready) == 1 and not self.running and self.lone is None:
            import mlx.core as mx

            self.lone = LoneDecoder(self.engine.batch_model, ready[0],
                                    mx.array(ready[0].taken[-1:]), self.step_costs, self.draft)
            return
        self._join(self._take_lone() + ready)  # not alone any more: all decode in the batch

    def _take_lone(self) -> list[Sequence]:
        """The lone sequence, out of its loop to join the batch ([] if its last token
        finished it)."""
        if self.lone is None:
            return []
        lone, self.lone = self.lone, None
        _, done = lone.handover()
        if done:
            self._finish(lone.seq, lone.cache, lone.held[:-1])
            return []
        return [lone.seq]

    def _join(self, seqs: list[Sequence]) -> None:
        """Into the batch, each with the token it sampled last (its cache holds the ones
        before, which penalties look back on); greedy ones share one batched argmax."""
        self._insert(seqs, [seq.taken[-1:] for seq in seqs],  # fed by their first step there
                     [seq.prompt + seq.taken[:-1] for seq in seqs])

    def _insert(self, seqs: list[Sequence], inputs: list[list[int]], before: list[list[int]]):
        """Hand sequences to the batch: `inputs` still to feed on top of each cache, which
        holds `before` (what penalties look back on)."""
        uids = self.batch.insert(
            inputs,
            max_tokens=[seq.remaining for seq in seqs],
            caches=[seq.cache for seq in seqs],
            all_tokens=before,
            samplers=[None if _is_greedy(seq.sampling.sampler) else seq.sampling.sampler
                      for seq in seqs],
            logits_processors=[seq.sampling.processors for seq in seqs],
            stop_sequences=[self._stop_tokens[seq.request.ignore_eos] for seq in seqs],
        )
        for uid, seq in zip(uids, seqs, strict=True):
            seq.uid, seq.cache = uid, []  # the batch holds (a copy of) its cache now
            self.running[uid] = seq

    def _decode_lone(self) -> None:
        lone = self.lone
        self.figures.batch_sizes[1] += 1
        before = len(lone.seq.taken)
        done = lone.step()  # a speculative step may take several tokens
        self.figures.generated_tokens += len(lone.seq.taken) - before
        self.figures.recent.append((time.monotonic(), len(lone.seq.taken) - before))
        if done:  # done (cancelled too): the cache holds the token just read
            self.lone = None
            self._finish(lone.seq, lone.cache, lone.held)

    def _decode(self) -> None:
        if (speculated := self.speculation.step(self.batch, self.running)) is not None:
            self._leave(*speculated)  # each row verified its own draft (batch/speculative.py)
            return
        with self.engine.batch_kernels:  # CUDA: mlxc's kernels for the batched step
            progress, responses = self.speculation.plain(
                self.batch, steady=self.prefilling is None and self.lone is None)
        for r in progress:  # prompts the batch prefills (a burst)
            if (seq := self.running.get(r.uid)) is not None:
                seq.generation.prompt_tokens_done = r.progress[0]
        if responses:
            self.figures.batch_sizes[len(responses)] += 1
            self.figures.generated_tokens += len(responses)
            self.figures.recent.append((time.monotonic(), len(responses)))
        leaving = []
        for r in responses:
            seq = self.running.get(r.uid)
            if seq is None or not seq.take(r.token, r.logprobs, r.finish_reason):
                continue
            if r.finish_reason is not None:  # the batch let it go and handed its state out
                del self.running[r.uid]
                self._finish(seq, r.prompt_cache, r.all_tokens)
            else:
                leaving.append(r.uid)
        self._leave(leaving)

    def _leave(self, leaving: list[int], taken: int = 0) -> None:
        """Let the sequences a step finished go (and those cancelled), with their states;
        `taken`: the tokens a speculative step took (a plain one counts its responses)."""
        if taken:
            self.figures.batch_sizes[len(self.running)] += 1
            self.figures.generated_tokens += taken
            self.figures.recent.append((time.monotonic(), taken))
        for uid, seq in self.running.items():  # cancelled while joining: no token yet
            if uid not in leaving and seq.generation.cancelled.is_set():
                seq.finish = "cancelled"
                leaving.append(uid)
        if leaving:
            states = self.batch.remove(leaving, return_prompt_caches=True)
            for uid in leaving:
                seq = self.running.pop(uid)
                cache, tokens = states.get(uid, (None, None))
                if not seq.taken:  # left while the batch prefilled it: a padded state, not kept
                    cache = None
                self._finish(seq, cache, tokens)
        if len(self.running) == 1 and self.lone is None and not (
            self.waiting or self.prefilling or self.ready
        ):
            self._demote()

    def _demote(self) -> None:
        """The batch's last sequence goes back to the lone loop: `BatchGenerator` decodes one
        sequence at 0.64x mlx-lm's own loop on the H200 (batch/lone.py). Its next token, already
        being computed (with its processors: a grammar must not see it twice), moves with it.
        Reads mlx-lm's generation batch; without it (another mlx-lm) the sequence stays."""
        batch = self.batch
        gen = getattr(batch, "_generation_batch", None)
        try:
            if len(gen) != 1 or len(batch._prompt_batch) or batch._unprocessed_sequences:
                return
            uid, pending, row = gen.uids[0], gen._next_tokens, gen._next_logprobs[0]
        except (AttributeError, TypeError, IndexError):
            return
        seq = self.running.get(uid)
        if seq is None or not seq.taken or pending is None:
            return
        cache, _ = batch.remove([uid], return_prompt_caches=True)[uid]
        del self.running[uid]
        seq.uid, seq.cache = None, cache  # holds the prompt and every token taken
        self.lone = LoneDecoder.resume(self.engine.batch_model, seq, pending, row,
                                       self.step_costs, self.draft)
        self.figures.back_alone += 1

    # -- leaving --------------------------------------------------------------------------

    def _finish(self, seq: Sequence, cache: list[Any] | None, held: list[int] | None) -> None:
        finish(self.engine, self.figures, self.next_turns, seq, cache, held)

    def cancel_all(self, error: Exception) -> None:
        """Fail every sequence (a step failed: its batch cannot be trusted)."""
        lone = self.lone.seq if self.lone is not None else None
        self.lone = None
        for seq in [*self.running.values(), self.prefilling, lone, *self.ready]:
            if seq is not None:
                seq.generation.publish(Failed(error))
        for _, generation in self.waiting:
            generation.publish(Failed(error))
        self.running.clear()
        self.ready.clear()
        self.waiting.clear()
        self.prefilling = None
        self.batch = self._new_batch()  # whatever state the failed step left is dropped


def _is_greedy(sampler: Any) -> bool:
    from mlx_lm.sample_utils import greedy_sampler

    return sampler is greedy_sampler
