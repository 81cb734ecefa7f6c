"""How each generated row picks its next token: its own sampling settings and its own seeded generator.

A row's tokens depend only on its prompt and its settings, never on the rows it shares a batch with,
so a request served in a continuous batch gets the tokens it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encdec.errors import EncdecError


@dataclass(frozen=True)
class Sampling:
    """Greedy decoding by default; `do_sample` draws from the temperature / top-k / top-p filtered distribution."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise EncdecError(f"temperature must be positive when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise EncdecError(f"top_k must be at least 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EncdecError(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The row's own random stream: seeded by `seed`, else by the global torch RNG (so manual_seed governs it)."""
        if not self.do_sample:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(2**62, (1,)).item())
        return torch.Generator(device=device).manual_seed(seed)


def filtered_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """Float logits [..., V] scaled by the temperature, with the tokens outside top-k / top-p set to -inf."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def pick_tokens(
    logits: torch.Tensor, settings: list[Sampling], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """One token per row of float logits [B, V]: greedy rows by one argmax, sampling rows each from its own stream."""
    chosen = logits.argmax(-1)
    for row, (s, gen) in enumerate(zip(settings, generators)):
        if s.do_sample:
            probs = torch.softmax(filtered_logits(logits[row], s.temperature, s.top_k, s.top_p), dim=-1)
            chosen[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return chosen
