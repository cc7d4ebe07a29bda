"""The offloading benchmark's tables, printed from its JSON (what the README shows)."""

from __future__ import annotations


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
