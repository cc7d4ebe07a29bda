"""The offloading benchmark's tables, printed from its JSON (what the README shows)."""

from __future__ import annotations


def lossless(run: dict) -> bool:
    """A row whose outputs equal the unpatched model's: no stand-in and no low-bit host experts."""
    return run.get("standin") is None and run.get("host_precision") is None


def print_table(m: dict) -> None:
    link, host = m["link"], m["host"]
    where = (f"EMULATED link {link['gbps']:.4f} GB/s (one expert copy = {link['copy_to_layer_ratio']:.0f}x a layer's "
             f"decode compute) and EMULATED host ({host['host_to_link_bandwidth']}x the link's bandwidth; computing "
             f"an expert costs one copy at {host['crossover_tokens']} tokens)"
             if link["emulated"] else "real host-to-device link and host, nothing emulated")  # fmt: skip
    print(f"\noffload benchmark, model {m['model']} ({m['layers']} layers x {m['experts']} experts, top-{m['top_k']}, "
          f"{m['dtype']}) on {m['device']}, {where}")  # fmt: skip
    print(f"decode: {m['eval_tokens']} held-out tokens, one at a time; budgets and MB are of the experts' "
          f"{m['expert_bytes_bf16'] / 1e6:.2f} MB in bfloat16")  # fmt: skip
    runs = m["runs"]
    resident = runs[0]
    lru = {r["budget"]: r for r in runs if r["name"] == "lru"}
    head = (f"{'config':<20}{'budget':>7}{'MB':>6}{'slots':>6}{'decode/s':>9}{'x res':>7}{'x lru':>7}"
            f"{'prefill/s':>10}{'x lru':>7}{'hits':>6}{'miss/tok':>9}{'host/tok':>9}{'subs/tok':>9}{'KB/tok':>8}"
            f"{'bits/B':>8}{'d bits':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in runs:
        base = lru.get(r["budget"])
        x_lru = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}" if base else "-"
        x_lru_prefill = f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}" if base else "-"
        print(
            f"{r['name']:<20}{r['budget']:>7.3f}{r['device_expert_bytes'] / 1e6:>6.2f}{r['slots'] or '-':>6}"
            f"{r['decode_tokens_per_s']:>9.1f}{r['decode_tokens_per_s'] / resident['decode_tokens_per_s']:>7.2f}"
            f"{x_lru:>7}{r['prefill_tokens_per_s']:>10.0f}{x_lru_prefill:>7}{r['hit_rate']:>6.2f}"
            f"{r['misses_per_token']:>9.2f}{r['host_per_token']:>9.2f}{r['substituted_per_token']:>9.2f}"
            f"{r['bytes_per_token'] / 1024:>8.1f}{r['bits_per_byte']:>8.4f}"
            f"{(r['bits_per_byte'] / resident['bits_per_byte'] - 1) * 100:>7.2f}%"
        )
    print("MB: expert bytes on the device (slot pool + stand-ins); hits: routed experts resident or in flight when")
    print("their layer ran; host/tok: experts computed on the host per token; subs/tok: pairs a stand-in served")


def print_quality(m: dict) -> None:
    q = m["standin_quality"]
    print(f"\nstand-in quality, model {m['model']}: held-out bits per byte with EVERY expert replaced by its stand-in")
    print("  ".join(f"{kind} {v['bits_per_byte']:.4f} ({v['relative'] * 100:+.1f}%)" for kind, v in q.items()))


def compile_summary(m: dict) -> tuple[list[dict], dict[str, tuple[float, float, bool]]]:
    """Each compiled row beside its eager twin of the same run, and the issue's goals: name -> (measured, target,
    met). Rows: name, budget, eager and compiled decode tok/s, x eager, x compiled resident, bits/byte of both."""
    eager = {(r["name"], r["budget"]): r for r in m["runs"]}
    compiled = m.get("compiled_runs") or []
    res_c = next((r for r in compiled if r["name"] == "resident"), None)
    rows = []
    for r in compiled:
        e, speed = eager[(r["name"], r["budget"])], r["decode_tokens_per_s"]
        rows.append({"name": r["name"], "budget": r["budget"], "eager": e["decode_tokens_per_s"],
                     "compiled": speed, "x_eager": speed / e["decode_tokens_per_s"],
                     "x_resident_compiled": speed / res_c["decode_tokens_per_s"] if res_c else None,
                     "bits_eager": e["bits_per_byte"], "bits_compiled": r["bits_per_byte"],
                     "lossless": lossless(r)})  # fmt: skip
    by = {(r["name"], r["budget"]): r for r in rows}
    goals = {}
    if ("resident", 1.0) in by:
        goals["compiled resident x eager resident"] = (by["resident", 1.0]["x_eager"], 1.5)
    if ("patched-1.0", 1.0) in by:
        goals["patched-1.0 compiled x resident compiled"] = (by["patched-1.0", 1.0]["x_resident_compiled"], 0.95)
    if rows:
        goals["slowest compiled row x its eager twin"] = (min(r["x_eager"] for r in rows), 1.0)
    quarter = [
        r for r in rows if r["budget"] == 0.25 and r["lossless"] and r["name"] not in ("resident", "patched-1.0")
    ]
    if quarter:
        best = max(quarter, key=lambda r: r["eager"])  # the best lossless row eager, and the same row compiled
        goals[f"best lossless @0.25 ({best['name']}) compiled x eager"] = (best["x_eager"], 1.2)
    return rows, {k: (v, t, v >= t) for k, (v, t) in goals.items()}


def twin(name: str) -> str | None:
    """The configuration without the row's last mechanism: "auto+buddy" -> "auto", "lookahead" -> "lru"."""
    if name == "lookahead":
        return "lru"
    return name.split("+", 1)[0] if "+" in name else None


BUDDY_BITS = 0.5  # a buddy row's speed-up counts at most this bits/byte cost over its twin (%)
INT8_BITS = 0.5  # int8 host experts may cost at most this much bits/byte over exact host experts (%)


def mechanism_goals(m: dict) -> dict[str, tuple[float, float, bool]]:
    """The mechanism goals (issues 21 and 32) that one run's eager rows decide: name -> (measured ratio, target,
    met). A goal whose rows the mode did not run is left out."""
    by = {(r["name"], r["budget"]): r for r in m["runs"]}
    speed = lambda name, b: by[name, b]["decode_tokens_per_s"] if (name, b) in by else None  # noqa: E731
    goals = {}

    def ratio(label: str, name: str, base: str, b: float, target: float) -> None:
        if speed(name, b) and speed(base, b):
            x = speed(name, b) / speed(base, b)
            goals[f"{label} @{b:g}"] = (x, target, x >= target)

    for b in sorted({r["budget"] for r in m["runs"]} - {1.0}):
        exact = [r for r in m["runs"] if r["budget"] == b and lossless(r)]
        if speed("default", b) and exact:
            best = max(exact, key=lambda r: r["decode_tokens_per_s"])
            ratio(f"default x fastest lossless row ({best['name']})", "default", best["name"], b, 0.95)
        ratio("lookahead x lru", "lookahead", "lru", b, 1.0)
        ratio("auto+lookahead x auto", "auto+lookahead", "auto", b, 1.15 if b == 0.25 else 1.0)
        ratio("lookahead+lowrank x lru", "lookahead+lowrank", "lru", b, 1.0)
        ratio("lookahead+buddy x lru", "lookahead+buddy", "lru", b, 1.0)
        if b == 0.25:
            ratio("auto x static-frequency", "auto", "static-frequency", b, 1.3)
        exact = [n for n in ("host", "lru") if speed(n, b)]
        if speed("auto", b) and exact:
            best = max(exact, key=lambda n: speed(n, b))
            ratio(f"auto x the better of host and fetch ({best})", "auto", best, b, 0.95)
            ratio(f"auto measured on a loaded CPU x the better of host and fetch ({best})", "auto (measured loaded)",
                  best, b, 0.95)  # fmt: skip
        ratio("auto x the FreeToken-style split", "auto", "freetoken", b, 1.1)
        if ("host+int8", b) in by and ("host", b) in by:
            cost = (by["host+int8", b]["bits_per_byte"] / by["host", b]["bits_per_byte"] - 1) * 100
            x = speed("host+int8", b) / speed("host", b)
            goals[f"host+int8 x host ({cost:+.2f}% bits/byte, goal <= +{INT8_BITS}%; EMULATED host: bytes) @{b:g}"] = (
                x, 1.8, x >= 1.8 and cost <= INT8_BITS)  # fmt: skip
        buddies = []  # (within the bits/byte bound, speed x twin, cost %, name)
        for r in m["runs"]:
            base = by.get((twin(r["name"]), b))
            if r["budget"] == b and r.get("standin") == "buddy" and base is not None:
                cost = (r["bits_per_byte"] / base["bits_per_byte"] - 1) * 100
                buddies.append((cost <= BUDDY_BITS, r["decode_tokens_per_s"] / base["decode_tokens_per_s"], cost,
                                r["name"]))  # fmt: skip
        if buddies:
            within, x, cost, name = max(buddies)
            goals[f"best buddy row ({name}, {cost:+.2f}% bits/byte, goal <= +{BUDDY_BITS}%) x its twin @{b:g}"] = (
                x, 1.1, within and x >= 1.1)  # fmt: skip
    return goals


def print_goals(m: dict) -> None:
    for name, (v, t, met) in mechanism_goals(m).items():
        print(f"  {name}: {v:.2f} (goal >= {t}: {'met' if met else 'NOT met'})")


def print_compiled(m: dict) -> None:
    rows, goals = compile_summary(m)
    if not rows:
        return
    link = m.get("compiled_link") or {}
    print(
        f"\ncompile=True (static KV cache), model {m['model']}; compiled rows meet an EMULATED link of "
        f"{link.get('gbps', float('nan')):.4f} GB/s, calibrated on the compiled resident model as the eager one is"
    )
    head = (
        f"{'config':<20}{'budget':>7}{'eager/s':>9}{'compiled/s':>11}{'x eager':>8}{'x res c':>8}"
        f"{'bits/B e':>9}{'bits/B c':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        x_res = f"{r['x_resident_compiled']:.2f}" if r["x_resident_compiled"] is not None else "-"
        print(f"{r['name']:<20}{r['budget']:>7.3f}{r['eager']:>9.1f}{r['compiled']:>11.1f}{r['x_eager']:>8.2f}"
              f"{x_res:>8}{r['bits_eager']:>9.4f}{r['bits_compiled']:>9.4f}")  # fmt: skip
    for name, (v, target, met) in goals.items():
        print(f"goal {name}: {v:.2f} (target >= {target}) {'met' if met else 'NOT met'}")
