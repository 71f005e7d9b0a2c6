"""KoboldCpp's performance counters (`/api/extra/perf`), kept from each finished job's totals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from galatea.engine.generate import Chunk


@dataclass
class Perf:
    last_process: float = 0.0  # milliseconds per prompt token read, last generation (KoboldCpp's unit)
    last_eval: float = 0.0  # milliseconds per generated token, last generation (KoboldCpp's unit)
    last_token_count: int = 0
    last_input_count: int = 0
    last_cached_count: int = 0  # prompt tokens reused from the prompt cache
    last_shifted_count: int = 0  # of those, moved to new positions (context shift, chunk reuse)
    last_recomputed_count: int = 0  # prompt tokens read (computed) for the last generation
    last_drafted_count: int = 0  # speculative decoding: tokens drafted in the last generation
    last_accepted_count: int = 0  # of those, kept
    last_seed: int = -1
    total_gens: int = 0
    stop_reason: int = -1  # KoboldCpp: 0 length, 1 EOS/stop string, 2 custom stopper (abort)
    started: float = field(default_factory=time.time)

    def record(self, last: Chunk) -> None:
        """A job ended with `last`, its final chunk (which carries the generation's totals)."""
        self.last_input_count, self.last_token_count = last.prompt_tokens, last.generated_tokens
        self.last_cached_count, self.last_shifted_count = last.cached_tokens, last.shifted_tokens
        self.last_drafted_count, self.last_accepted_count = last.drafted_tokens, last.accepted_tokens
        read = last.prompt_tokens - last.cached_tokens
        self.last_recomputed_count = read
        # KoboldCpp divides the reading time by the whole prompt's tokens
        self.last_process = 1000.0 * read / last.prefill_tok_s / last.prompt_tokens if last.prefill_tok_s else 0.0
        self.last_eval = 1000.0 / last.decode_tok_s if last.decode_tok_s else 0.0
        self.last_seed = last.seed if last.seed is not None else -1
        self.total_gens += 1
        self.stop_reason = {"length": 0, "stop": 1}.get(last.finish_reason or "", 2)
