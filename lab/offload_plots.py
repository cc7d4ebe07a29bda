"""Plots of the offloading benchmark. matplotlib is imported only here, and only when something is drawn."""

from __future__ import annotations

from pathlib import Path

UNPATCHED = ("resident", "patched-1.0", "naive")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_offload(result: dict, out: Path) -> list[Path]:
    """Per model: decode speed against budget, and bits per byte against decode speed with the frontier."""
    pngs = []
    for m in result["models"]:
        pngs += [_speed_vs_budget(m, out), _bits_vs_speed(m, out)]
    return pngs


def _tag(m: dict) -> str:
    return "emulated link and host" if m["link"]["emulated"] else "real link"


def _speed_vs_budget(m: dict, out: Path) -> Path:
    plt = _pyplot()
    runs, resident = m["runs"], m["runs"][0]
    series = sorted({r["name"] for r in runs if r["name"] not in UNPATCHED})
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, name in enumerate(series):
        pts = sorted((r["budget"], r["decode_tokens_per_s"] / resident["decode_tokens_per_s"])
                     for r in runs if r["name"] == name)  # fmt: skip
        ax.plot(*zip(*pts, strict=True), marker="o", label=name, color=plt.get_cmap("tab20")(i % 20),
                ls=("-" if i < 10 else "--") if len(pts) > 1 else "none")  # fmt: skip
    ax.axhline(1.0, color="k", ls="--", label="resident (every expert on the device)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expert budget (fraction of the experts' bf16 bytes)")
    ax.set_ylabel("decode speed / resident's")
    ax.set_title(f"{m['model']}: decode speed vs budget ({_tag(m)})")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out / f"offload-{m['model']}-speed-vs-budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bits_vs_speed(m: dict, out: Path) -> Path:
    plt = _pyplot()
    runs, resident = m["runs"], m["runs"][0]
    markers = {0.125: "v", 0.25: "o", 0.5: "s"}
    pts = [(r["decode_tokens_per_s"] / resident["decode_tokens_per_s"],
            (r["bits_per_byte"] / resident["bits_per_byte"] - 1) * 100, r) for r in runs
           if r["name"] not in UNPATCHED]  # fmt: skip
    names = sorted({r["name"] for _, _, r in pts})
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for x, y, r in pts:
        i = names.index(r["name"])
        ax.scatter(x, y, marker=markers.get(r["budget"], "x"), color=plt.get_cmap("tab20")(i % 20),
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
    plt.close(fig)
    return path
