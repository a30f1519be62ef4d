"""One sequence's tokens: what to sample next and what the answer is.

- `generate.py` — the token loop (mlx-lm's, reshaped for the time to first token);
- `sampling.py`, `seeds.py` — samplers, penalties and per-sequence seeds;
- `constraints.py`, `grammar_mask.py` — structured outputs and forced tool calls (llguidance);
- `stops.py`, `tools.py` — stop strings and tool-call parsing on the streamed text;
- `logprobs.py`, `scoring.py` — log-probabilities of answers and of prompts.

Imports no other engine package.
"""
