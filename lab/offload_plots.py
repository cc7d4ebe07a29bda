"""Plots of the offloading benchmark (matplotlib is imported only when something is drawn)."""

from __future__ import annotations

from pathlib import Path

from lab.figures import colour, figure

UNPATCHED = ("resident", "patched-1.0", "naive")


def plot_offload(result: dict, out: Path) -> list[Path]:
    """Per model: decode speed against budget, and bits per byte against decode speed with the frontier."""
    pngs = []
    for m in result["models"]:
        pngs += [_speed_vs_budget(m, out), _bits_vs_speed(m, out)]
    return pngs


def _tag(m: dict) -> str:
    return "emulated link and host" if m["link"]["emulated"] else "real link"


def _speed_vs_budget(m: dict, out: Path) -> Path:
    """Decode speed over resident's, per configuration: lines against the budget when the bench ran several budgets,
    else bars at the one budget it ran (points stacked at one x would hide each other under the legend)."""
    runs, resident = m["runs"], m["runs"][0]
    series = sorted({r["name"] for r in runs if r["name"] not in UNPATCHED})
    budgets = sorted({r["budget"] for r in runs if r["name"] not in UNPATCHED})
    speed = {(r["name"], r["budget"]): r["decode_tokens_per_s"] / resident["decode_tokens_per_s"] for r in runs}
    if len(budgets) > 1:
        fig, ax = figure(figsize=(7, 4.4))
        for i, name in enumerate(series):
            pts = sorted((b, speed[name, b]) for b in budgets if (name, b) in speed)
            ax.plot(*zip(*pts, strict=True), marker="o", label=name, color=colour(i), ls="-" if i < 10 else "--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("expert budget (fraction of the experts' bf16 bytes)")
        ax.axhline(1.0, color="k", ls="--", label="resident (every expert on the device)")
        ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        order = sorted(series, key=lambda n: speed[n, budgets[0]])
        fig, ax = figure(figsize=(7, 0.8 + 0.28 * len(order)))
        ax.barh(
            range(len(order)), [speed[n, budgets[0]] for n in order], color=[colour(series.index(n)) for n in order]
        )
        ax.set_yticks(range(len(order)), order, fontsize=8)
        ax.set_xlabel(f"decode speed / resident's, at budget {budgets[0]:g}")
    ax.set_title(f"{m['model']}: decode speed ({_tag(m)})")
    fig.tight_layout()
    path = out / f"offload-{m['model']}-speed-vs-budget.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend sits outside the axes
    return path


def _bits_vs_speed(m: dict, out: Path) -> Path:
    runs, resident = m["runs"], m["runs"][0]
    markers = {0.125: "v", 0.25: "o", 0.5: "s"}
    pts = [(r["decode_tokens_per_s"] / resident["decode_tokens_per_s"],
            (r["bits_per_byte"] / resident["bits_per_byte"] - 1) * 100, r) for r in runs
           if r["name"] not in UNPATCHED]  # fmt: skip
    names = sorted({r["name"] for _, _, r in pts})
    fig, ax = figure(figsize=(7, 4.4))
    for x, y, r in pts:
        i = names.index(r["name"])
        ax.scatter(x, y, marker=markers.get(r["budget"], "x"), color=colour(i),
                   label=r["name"] if r["budget"] == 0.25 else None)  # fmt: skip
    frontier, best = [], float("inf")  # the fastest configuration for each accuracy: no other is faster and better
    for x, y, _ in sorted(pts, key=lambda p: -p[0]):
        if y < best:
            frontier.append((x, y))
            best = y
    if frontier:
        ax.step(*zip(*sorted(frontier), strict=True), where="post", color="grey", lw=1, label="frontier")
    ax.scatter(1.0, 0.0, marker="*", s=150, color="k", label="resident")
    ax.set_xlabel("decode speed / resident's")
    ax.set_ylabel("held-out bits per byte vs resident (%)")
    ax.set_title(f"{m['model']}: accuracy vs speed (budget 1/8 v, 1/4 o, 1/2 s; {_tag(m)})")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out / f"offload-{m['model']}-bits-vs-speed.png"
    fig.savefig(path, dpi=110)
    return path
