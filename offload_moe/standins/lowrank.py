"""Low-rank stand-ins: a small, always-resident approximation of every expert, used when the real one is missing.

Each matrix W [out, in] of an expert is replaced by U [out, r] @ V [r, in]. Plain truncated SVD minimises
||W - UV||_F; the activation-aware fit minimises ||(W - UV) X^T||_F over calibration inputs X that were routed to
this expert (whiten by the Cholesky factor of X^T X, truncate, un-whiten), which is what matters at inference.
"""

from __future__ import annotations

import torch


def lowrank(w: torch.Tensor, rank: int, cov: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (U [out, r], V [r, in]) of the best rank-`rank` approximation of `w` [out, in].

    cov: optional input second-moment matrix [in, in] (X^T X / n); the fit is then activation-aware.
    """
    rank = max(1, min(rank, *w.shape))
    if cov is None and 8 * rank < min(w.shape) and min(w.shape) > 1024:  # a large matrix: randomized SVD
        u, s, v = torch.svd_lowrank(w.float(), q=rank + 16, niter=4)
        return (u[:, :rank] * s[:rank]), v[:, :rank].T.contiguous()
    w = w.double()
    if cov is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
    cov = cov.double()
    eps = 1e-6 * cov.diagonal().mean().clamp_min(1e-12)
    chol = torch.linalg.cholesky(cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype))  # [in, in], C = L L^T
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)  # (W L) = U S V^T
    v = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False)  # V^T L^-1: [r, in]
    return (u[:, :rank] * s[:rank]).float(), v.float()


def rank_for_fraction(fraction: float, shapes: dict[str, tuple[int, ...]]) -> int:
    """Largest rank whose factors of all matrices of one expert take at most `fraction` of its parameters."""
    full = sum(a * b for a, b in shapes.values())
    per_rank = sum(a + b for a, b in shapes.values())
    return max(0, int(fraction * full // per_rank))


class LowRankFactors:
    """Factors of every expert's matrices, stacked per layer: `u[name]` [L, E, out, r], `v[name]` [L, E, r, in].

    One rank for all experts keeps the stand-in compute batched; `apply` evaluates one expert's approximation.
    """

    def __init__(self, u: dict[str, torch.Tensor], v: dict[str, torch.Tensor]):
        self.u, self.v = u, v
        self.rank = next(iter(v.values())).shape[2]

    def expert_bytes(self, layer: int, expert: int) -> int:
        """Bytes of one expert's factors."""
        return sum(t[layer, expert].numel() * t.element_size() for d in (self.u, self.v) for t in d.values())

    def truncated(self, rank: int) -> LowRankFactors:
        """The best rank-`rank` stand-ins these factors hold: their leading columns (SVD order)."""
        return LowRankFactors(
            {n: t[..., :rank] for n, t in self.u.items()}, {n: t[:, :, :rank] for n, t in self.v.items()}
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> LowRankFactors:
        return LowRankFactors(
            {n: t.to(device, dtype) for n, t in self.u.items()}, {n: t.to(device, dtype) for n, t in self.v.items()}
        )

    def apply(self, layer: int, expert: int, x: torch.Tensor, act_fn) -> torch.Tensor:
        """Approximate output of a gated expert (gate_up_proj, down_proj) on x [T, H] -> [T, H]."""
        gu = (x @ self.v["gate_up_proj"][layer, expert].T) @ self.u["gate_up_proj"][layer, expert].T  # [T, 2I]
        gate, up = gu.chunk(2, dim=-1)
        h = act_fn(gate) * up  # [T, I]
        return (h @ self.v["down_proj"][layer, expert].T) @ self.u["down_proj"][layer, expert].T  # [T, H]
