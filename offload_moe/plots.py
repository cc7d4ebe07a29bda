"""Plots of the offloading benchmark. matplotlib is imported only here, and only when something is drawn."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_offload(result: dict, out: Path) -> list[Path]:
    """Decode speed against budget, and bits per byte against decode speed; returns the PNG paths."""
    plt = _pyplot()
    runs = result["runs"]
    tag = "emulated link" if result["link"]["emulated"] else "real link"
    resident = runs[0]
    series = sorted({r["name"] for r in runs if r["name"] not in ("resident", "patched-1.0", "naive")})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in series:
        pts = sorted((r["budget"], r["decode_tokens_per_s"]) for r in runs if r["name"] == name)
        ax.plot(*zip(*pts, strict=True), "o-", label=name)
    ax.axhline(resident["decode_tokens_per_s"], color="k", ls="--", label="resident (all experts on device)")
    naive = next(r for r in runs if r["name"] == "naive")
    ax.axhline(naive["decode_tokens_per_s"], color="grey", ls=":", label="naive (copy every use)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expert budget (fraction of all experts' bytes)")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"reference-moe decode speed vs budget ({tag}, {result['device']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    speed_png = out / "offload-speed-vs-budget.png"
    fig.savefig(speed_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = {0.125: "v", 0.25: "o", 0.5: "s"}
    for name in series:
        for r in (r for r in runs if r["name"] == name):
            ax.scatter(r["decode_tokens_per_s"], r["bits_per_byte"], marker=markers.get(r["budget"], "x"),
                       color=f"C{series.index(name)}", label=name if r["budget"] == 0.25 else None)  # fmt: skip
    ax.scatter(resident["decode_tokens_per_s"], resident["bits_per_byte"], marker="*", s=150, color="k",
               label="resident")  # fmt: skip
    ax.set_xlabel("decode tokens / s")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(f"accuracy vs speed (markers: budget 1/8 v, 1/4 o, 1/2 s; {tag})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tradeoff_png = out / "offload-bits-vs-speed.png"
    fig.savefig(tradeoff_png, dpi=110)
    plt.close(fig)
    return [speed_png, tradeoff_png]
