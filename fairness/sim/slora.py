"""S-LoRA's engine, as the VTC artifact runs it (the engine of the VTC paper's experiments)."""

from __future__ import annotations

import numpy as np

from fairness.sim.simulator import Simulator, _Seq


class SloraSimulator(Simulator):
    """S-LoRA's engine, as the VTC artifact runs it: KV is reserved for a request's whole output at admission (so
    nothing is ever preempted); a prefill batch runs alone when nothing is running, or after `prefill_every` decode
    steps, holding at most `max_step_tokens` prompt tokens; decode steps run every running request."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._decodes_since_prefill = 0

    def next_batch(self) -> tuple[list[_Seq], list[tuple[_Seq, int]]]:
        running = [s for s in self.running if s.prefilled >= s.prompt]
        if not running or self._decodes_since_prefill >= self.engine.prefill_every:
            chunks = self._prefill_batch()
            if chunks:
                self._decodes_since_prefill = 0
                return [], chunks
        self._decodes_since_prefill += 1
        return running, []

    def _prefill_batch(self) -> list[tuple[_Seq, int]]:
        """Admit in the policy's order while the reservation of every request's full output fits the KV pool."""
        tokens, chunks = 0, []
        _, max_running = self.driver.limits(self.t, self.engine.max_step_tokens, self.engine.max_running)
        for cand in self.driver.candidates(self.t, lambda: len(self.running) < max_running):
            s = self.seqs[cand.id]
            if tokens + s.prompt > self.engine.max_step_tokens or not self._fits(s):
                break
            self.admit(s)
            chunks.append((s, s.prompt))
            tokens += s.prompt
        return chunks

    def _fits(self, new: _Seq) -> bool:
        """S-LoRA's test: with every request decoding to its cap, the KV in use never exceeds the pool."""

        def cap(s: _Seq) -> int:  # the request's max_tokens
            return s.info.max_output_tokens or s.output_tokens

        lens = [(s.kv, cap(s) - s.generated) for s in self.running] + [(new.prompt + 1, cap(new) - 1)]
        lens.sort(key=lambda x: -x[1])  # the longest remaining output first
        held = np.cumsum([n for n, _ in lens])
        need = max(left * (i + 1) + held[i] for i, (_, left) in enumerate(lens))
        return need < self.engine.kv_tokens
