"""A grammar as a logits processor: before each token, every token the grammar does not allow
next gets -inf. One `GrammarProcessor` per sequence (it holds the matcher's state); it takes
mlx-lm's processor signature, `processor(tokens, logits) -> logits`, and advances its matcher
from `tokens` itself (the sequence so far), so it needs no other hook from the engine and works
the same in mlx-lm's BatchGenerator. A loop inside a JSON string or number is closed
(loop_guard.py). Engine thread only."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def llguidance_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of the model's tokenizer; built once per tokenizer (~0.5 s)."""
    import llguidance.hf
    from transformers import PreTrainedTokenizerFast

    with _lock:
        if (known := _tokenizers.get(tokenizer)) is not None:
            return known
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        if not isinstance(hf, PreTrainedTokenizerFast):
            raise ValueError("structured outputs need a fast (tokenizer.json) tokenizer; "
                             "this model's is not one")
        built = llguidance.hf.from_tokenizer(hf, eos_token=sorted(tokenizer.eos_token_ids))
        _tokenizers[tokenizer] = built
        return built


class GrammarProcessor:
    def __init__(self, grammar: str, tokenizer: Any) -> None:
        import llguidance

        from mlxc.engine.decode.loop_guard import LoopGuard, tables_for

        lltokenizer = llguidance_tokenizer(tokenizer)
        self._matcher = llguidance.LLMatcher(lltokenizer, grammar)
        if self._matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {self._matcher.get_error()}")
        self._vocab = len(tokenizer)
        self._guard = LoopGuard(tables_for(tokenizer, lltokenizer, self._vocab))
        self._mask = np.zeros((self._vocab + 31) // 32, dtype=np.int32)
        self._seen: int | None = None  # tokens of the sequence already fed to the matcher
        self._sampled: Any = None  # the token array the sampler gave last (see `watch`)

    def watch(self, sampler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """The sampler, noting what it samples: the next call reads the new token from there
        (already evaluated when the engine has read it) instead of from `tokens`, whose
        slice would cost a round trip to the GPU (~0.2 ms a token measured on an H200)."""

        def sample(logprobs: Any) -> Any:
            self._sampled = sampler(logprobs)
            return self._sampled

        return sample

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        size = tokens.size
        if self._seen is None:  # the first call: everything so far is the prompt
            self._seen = size
        elif size > self._seen:
            if size == self._seen + 1 and self._sampled is not None:
                new = [self._sampled.item()]
            else:
                new = tokens.reshape(-1)[self._seen :].tolist()
            for token in new:
                if not self._matcher.consume_token(token):
                    raise RuntimeError(f"the grammar refused token {token}: "
                                       f"{self._matcher.get_error()}")
                self._guard.consume(token)
            self._seen = size
        self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self._vocab]
        allowed = self._guard.restrict(allowed.astype(bool))
        width = logits.shape[-1]
        if width > allowed.size:  # a padded output layer: its extra rows are no tokens
            allowed = np.concatenate([allowed, np.zeros(width - allowed.size, bool)])
        return mx.where(mx.array(allowed[:width]), logits, -mx.inf)
