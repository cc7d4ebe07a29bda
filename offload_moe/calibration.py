"""`calibrate(model, texts, tokenizer)`: run the model on calibration text, record routing and each expert's inputs,
and compute what the stand-ins need: activation-aware low-rank stand-ins, buddy lists, entropy thresholds and
expert frequencies. Saved as one safetensors file with a JSON header; `patch(..., calibration=path)` loads it.

Experts are read one at a time (from the model, or from the host store of a patched / `load`ed model), so calibrating
a model whose experts do not fit in RAM works: what is held is one d x d input covariance per expert.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hooks import MoEBlock
from offload_moe.blocks import moe_blocks
from offload_moe.handle import handle_of
from offload_moe.progress import progress
from offload_moe.standins.catalog import StandinCatalog
from offload_moe.standins.lowrank import LowRankFactors, lowrank, rank_for_fraction
from offload_moe.standins.quant import BITS, quantize

FORMAT = "offload-moe-calibration/2"
TRACE_TOKENS = 4096  # the routing trace keeps the first this many tokens (`fit` replays them through the cache)


@dataclass
class Calibration:
    """Per MoE layer: frequencies [L, E], buddies [L, E, Kmax] (-1 padded, best first), tau [L] (TAE threshold),
    stand-ins (factors at `standins.rank`; lower ranks are their leading columns); the routing trace [T, L, K] of the
    first TRACE_TOKENS tokens (None in files written before it was kept)."""

    meta: dict
    frequencies: torch.Tensor
    buddies: torch.Tensor
    tau: torch.Tensor
    standins: LowRankFactors
    standin_errors: torch.Tensor  # [L, E, K] relative output error of each candidate stand-in (meta "standin_kinds")
    routing: torch.Tensor | None = None  # [T, L, K] int16 expert ids, in token order

    def catalog(self) -> StandinCatalog:
        """What `standin="mixed"` chooses from: each candidate's error per expert, and how often experts are used."""
        return StandinCatalog(
            self.standins.rank,
            tuple(self.meta["standin_kinds"]),
            self.meta["group_size"],
            self.standin_errors,
            self.frequencies,
        )

    def check_fits(self, blocks: list[MoEBlock]) -> None:
        """Refuse a calibration made for another model geometry."""
        got = (len(blocks), blocks[0].num_experts, blocks[0].experts.gate_up_proj.shape[-1])
        want = (self.meta.get("layers"), self.meta.get("experts"), self.meta.get("hidden"))
        if got != want:
            raise ValueError(
                f"calibration was made for a {self.meta.get('model')} with (layers, experts, hidden) = {want}, "
                f"but this model has {got}; calibrate this model"
            )

    def save(self, path: str | Path) -> None:
        tensors = {
            "frequencies": self.frequencies,
            "buddies": self.buddies,
            "tau": self.tau,
            "standin_errors": self.standin_errors,
        }
        if self.routing is not None:
            tensors["routing"] = self.routing.contiguous()
        for n in self.standins.u:
            tensors[f"standin.{n}.u"] = self.standins.u[n].contiguous()
            tensors[f"standin.{n}.v"] = self.standins.v[n].contiguous()
        save_file(tensors, str(path), metadata={"offload_moe": json.dumps(self.meta)})


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist; create it with offload_moe.calibrate")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("offload_moe", "{}"))
        t = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not an offload-moe calibration file: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a calibration file of this offload-moe (format {meta.get('format')!r}, "
            f"expected {FORMAT!r}); run offload_moe.calibrate again"
        )
    names = meta["standin_names"]
    standins = LowRankFactors({n: t[f"standin.{n}.u"] for n in names}, {n: t[f"standin.{n}.v"] for n in names})
    return Calibration(meta, t["frequencies"], t["buddies"], t["tau"], standins, t["standin_errors"], t.get("routing"))


def expert_weights(block, store, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert's matrices in float32 on the CPU, from the model itself or from a patched model's host store."""
    if store is None:
        return {n: getattr(block.experts, n)[expert].detach().float().cpu() for n in block.expert_param_names()}
    return {n: t.float() for n, t in store.expert_tensors(layer, expert).items()}


def _relative_error(w: dict[str, torch.Tensor], x: torch.Tensor, ref: torch.Tensor, act_fn) -> float:
    """||expert_w(x) - ref||^2 / ||ref||^2 for gated weights w."""
    out = _gated_hidden(w, x, act_fn) @ w["down_proj"].T
    return float(((out - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-12))


def _gated_hidden(w: dict[str, torch.Tensor], x: torch.Tensor, act_fn) -> torch.Tensor:
    gate, up = (x @ w["gate_up_proj"].T).chunk(2, dim=-1)
    return act_fn(gate) * up  # [T, I]


class _Seen:
    """What calibration records at each MoE layer as the model runs: per expert the sum of x x^T over its inputs,
    their count and up to `samples_per_expert` of them; per token the routing entropy; the first TRACE_TOKENS tokens'
    routing."""

    def __init__(self, layers: int, experts: int, hidden: int, samples_per_expert: int):
        self.cov = torch.zeros(layers, experts, hidden, hidden, dtype=torch.float64)
        self.count = torch.zeros(layers, experts)
        self.samples: list[list[list[torch.Tensor]]] = [[[] for _ in range(experts)] for _ in range(layers)]
        self.taes: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        self._trace: list[list[torch.Tensor]] = [[] for _ in range(layers)]  # per layer, [T, K] per call
        self._experts, self._samples = experts, samples_per_expert

    def hook(self, layer: int):
        """A forward pre-hook on `layer`'s experts module (called with hidden states, top-k ids, top-k weights)."""

        def record(module, args):
            x, index, weights = args[0].float().cpu(), args[1].cpu(), args[2].float().cpu()
            for e in range(self._experts):
                rows = (index == e).any(-1)
                if rows.any():
                    xe = x[rows].double()
                    self.cov[layer, e] += xe.T @ xe
                    self.count[layer, e] += xe.shape[0]
                    have = sum(s.shape[0] for s in self.samples[layer][e])
                    if have < self._samples:
                        self.samples[layer][e].append(x[rows][: self._samples - have])
            p, k = weights.clamp_min(1e-12), index.shape[-1]
            self.taes[layer].append(-(p * p.log()).sum(-1) / math.log(k) if k > 1 else torch.zeros(index.shape[0]))
            kept = sum(r.shape[0] for r in self._trace[layer])
            if kept < TRACE_TOKENS:
                self._trace[layer].append(index[: TRACE_TOKENS - kept].to(torch.int16))

        return record

    def routing(self) -> torch.Tensor:
        """[T, L, K] the recorded tokens' expert ids."""
        return torch.stack([torch.cat(t) for t in self._trace], dim=1)


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    texts: list[str],
    tokenizer,
    *,
    standin_fraction: float = 0.1,
    seq_len: int = 256,
    max_tokens: int = 32_768,
    buddy_list: int = 8,
    tae_percentile: float = 15.0,
    samples_per_expert: int = 256,
    group_size: int = 64,
    path: str | Path | None = None,
) -> Calibration:
    """Calibrate the stand-ins on `texts` (at most `max_tokens` tokens, in windows of `seq_len`).

    standin_fraction: stand-ins are fitted at the rank whose factors take this fraction of an expert's parameters
    (patch can use any lower rank). Buddy lists rank, for each expert i, the others by how well they reproduce i's
    output on the inputs routed to i (relative squared error), keeping `buddy_list`. tau is the `tae_percentile`-th
    percentile of each layer's token activating entropy (BuddyMoE). Each candidate stand-in (quantized at every bit
    width with groups of `group_size`, low-rank at the fitted rank) is scored by its relative squared output error
    on the expert's own inputs, for `standin="mixed"`. Saved to `path` if given.
    """
    blocks = moe_blocks(model)
    handle = handle_of(model)  # a patched or loaded model: read experts from its host store
    store = handle.store if handle is not None else None
    if set(blocks[0].expert_param_names()) != {"gate_up_proj", "down_proj"}:
        raise ValueError("calibrate supports gated experts (gate_up_proj, down_proj)")
    n_layers, n_exp = len(blocks), blocks[0].num_experts
    hidden = blocks[0].experts.gate_up_proj.shape[-1]
    ids = torch.tensor([i for t in texts for i in tokenizer(t)["input_ids"]][:max_tokens])
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text gives {ids.numel()} tokens; need at least seq_len={seq_len}")
    device = next(p.device for p in model.parameters() if not p.is_meta)

    seen = _Seen(n_layers, n_exp, hidden, samples_per_expert)
    handles = [b.experts.register_forward_pre_hook(seen.hook(b.index)) for b in blocks]
    try:
        for s in progress(range(0, ids.numel() - seq_len + 1, seq_len), "calibrate: routing", unit="chunk"):
            model(input_ids=ids[s : s + seq_len][None].to(device))
    finally:
        for h in handles:
            h.remove()
    cov, count, samples = seen.cov, seen.count, seen.samples

    rank = max(1, rank_for_fraction(standin_fraction, blocks[0].expert_shapes()))
    u = {n: [] for n in ("gate_up_proj", "down_proj")}
    v = {n: [] for n in ("gate_up_proj", "down_proj")}
    buddies = torch.full((n_layers, n_exp, min(buddy_list, n_exp - 1)), -1, dtype=torch.long)
    errors = torch.ones(n_layers, n_exp, len(BITS) + 1)  # no samples: as bad as leaving the expert out
    for b in progress(blocks, "calibrate: stand-ins and buddies", unit="layer"):
        act = b.experts.act_fn
        outs = {}
        layer_w = [expert_weights(b, store, b.index, e) for e in range(n_exp)] if n_exp <= 64 else None
        for e in range(n_exp):
            w = layer_w[e] if layer_w is not None else expert_weights(b, store, b.index, e)
            x = torch.cat(samples[b.index][e]) if samples[b.index][e] else torch.zeros(0, hidden)
            c_in = cov[b.index, e] / count[b.index, e] if count[b.index, e] > hidden else None
            h = _gated_hidden(w, x, act) if x.shape[0] else None
            c_mid = (h.double().T @ h.double()) / h.shape[0] if h is not None and h.shape[0] > h.shape[1] else None
            fitted = {}
            for name, c in (("gate_up_proj", c_in), ("down_proj", c_mid)):
                uu, vv = lowrank(w[name], rank, c)
                u[name].append(uu)
                v[name].append(vv)
                fitted[name] = uu @ vv
            outs[e] = (x, h @ w["down_proj"].T if h is not None else None)
            if h is not None:  # each candidate stand-in, on the expert's own inputs
                candidates = [
                    {n: quantize(t, bits, group_size, True).dequantize() for n, t in w.items()} for bits in BITS
                ] + [fitted]
                errors[b.index, e] = torch.tensor([_relative_error(c, x, outs[e][1], act) for c in candidates])
        for i in range(n_exp):  # rank substitutes for i by relative error on i's own inputs
            x, ref = outs[i]
            if ref is None or x.shape[0] == 0:
                continue
            err = {}
            for j in range(n_exp):
                if j != i:
                    wj = layer_w[j] if layer_w is not None else expert_weights(b, store, b.index, j)
                    err[j] = _relative_error(wj, x, ref, act)
            ranked = sorted(err, key=err.get)[: buddies.shape[-1]]
            buddies[b.index, i, : len(ranked)] = torch.tensor(ranked)
    standins = LowRankFactors(
        {n: torch.stack(t).view(n_layers, n_exp, *t[0].shape) for n, t in u.items()},
        {n: torch.stack(t).view(n_layers, n_exp, *t[0].shape) for n, t in v.items()},
    )
    tau = torch.tensor([float(torch.quantile(torch.cat(t), tae_percentile / 100)) for t in seen.taes])
    meta = {
        "format": FORMAT,
        "model": type(model).__name__,
        "layers": n_layers,
        "experts": n_exp,
        "hidden": hidden,
        "rank": rank,
        "standin_fraction": standin_fraction,
        "standin_names": ["gate_up_proj", "down_proj"],
        "tokens": int(ids.numel()),
        "text": f"{len(texts)} text(s), {sum(len(t) for t in texts)} characters",
        "tae_percentile": tae_percentile,
        "standin_kinds": [f"quant{bits}" for bits in BITS] + [f"lowrank{rank}"],
        "group_size": group_size,
    }
    result = Calibration(meta, count, buddies, tau, standins, errors, seen.routing())
    if path is not None:
        result.save(path)
    return result
