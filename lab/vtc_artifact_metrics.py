"""Recompute the VTC paper's measures from the measured runs its artifact publishes, with this project's code.

The artifact (github.com/Ying1123/VTC-artifact, Apache-2.0) ships every run behind the paper's figures as
`fair_bench/<SCHEDULER>/all_results_<workload>.jsonl`: one record per request measured on the authors' A10G. This
script turns them into `RequestRecord`s and applies `fairness.measure.records.paper_metrics`, so the simulator's numbers
(`lab.vtc_paper`, run by `python -m lab.fairness_bench --mode full`) are compared with the paper's own runs by one
definition. It writes lab/data/vtc_artifact_metrics.json (numbers only; the records stay in the artifact).

    git clone https://github.com/Ying1123/VTC-artifact /tmp/VTC-artifact
    python -m lab.vtc_artifact_metrics /tmp/VTC-artifact
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from fairness.measure.records import RequestRecord, paper_metrics

# the artifact's scheduler directories -> this project's policy names
# (the artifact's overload-weighted runs VTC twice: "WVTC" with the clients' weights, which is what this project's
# "vtc" does with weighted requests, and "VTC" ignoring them)
SCHEDULERS = {"VTC": "vtc", "FCFS": "fcfs", "LCF": "lcf", "VTC_oracle": "vtc-oracle", "VTC_predict": "vtc-pred",
              "VTC_pred_50": "vtc-oracle+-50%", "WVTC": "vtc", "LShare/rpm5": "rpm-5", "LShare/rpm10": "rpm-10",
              "LShare/rpm20": "rpm-20", "LShare/rpm30": "rpm"}  # fmt: skip


def records(path: Path) -> tuple[dict, list[RequestRecord]]:
    """The run's config and its requests (aborted ones, first_token_latency -1, never got a first token)."""
    run = json.loads(path.read_text().splitlines()[0])
    out = []
    for r in run["result"]["responses"]:
        served = r["first_token_latency"] != -1
        out.append(RequestRecord(r["adapter_dir"], r["req_time"], r["prompt_len"], r["output_len"],
                                 r["req_time"] + r["first_token_latency"] if served else None,
                                 r["req_time"] + r["request_latency"] if served else None))  # fmt: skip
    return run["config"], out


def per_client(recs: list[RequestRecord]) -> dict[str, list[int]]:
    """client -> [requests, input tokens, output tokens]: enough to check a generator against the runs."""
    out: dict[str, list[int]] = {}
    for r in recs:
        row = out.setdefault(r.client, [0, 0, 0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + r.input_tokens, row[2] + r.output_tokens
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path, help="a checkout of github.com/Ying1123/VTC-artifact")
    ap.add_argument("--out", type=Path, default=Path("lab/data/vtc_artifact_metrics.json"))
    ap.add_argument("--commit", help="the artifact's commit, if the checkout is not a git work tree")
    args = ap.parse_args()
    git = subprocess.run(["git", "-C", str(args.artifact), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = args.commit or git.stdout.strip() or None
    runs = []
    for directory, policy in SCHEDULERS.items():
        for path in sorted((args.artifact / "fair_bench" / directory).glob("all_results_*.jsonl")):
            config, recs = records(path)
            metrics = paper_metrics(recs)
            workload = path.stem.removeprefix("all_results_")
            unweighted = directory == "VTC" and workload == "overload-weighted"
            runs.append({"workload": workload, "artifact_dir": directory,
                         "policy": "vtc (weights ignored)" if unweighted else policy, "requests": len(recs),
                         "finished": sum(r.finish_s is not None for r in recs), "config": config,
                         "per_client": per_client(recs),
                         **{k: round(v, 3) for k, v in metrics.items()}})  # fmt: skip
            print(
                f"{directory:<14}{runs[-1]['workload']:<26}{metrics['acc_service_diff']:>12.0f}"
                f"{metrics['window_service_diff_avg']:>10.1f}{metrics['throughput_in_out_tok_s']:>8.0f}"
            )
    doc = {
        "source": "github.com/Ying1123/VTC-artifact fair_bench/*/all_results_*.jsonl (Apache-2.0), measured on "
        "an A10G with Llama-2-7B (S-LoRA)",
        "commit": commit,
        "metrics": "fairness.measure.records.paper_metrics (window 60 s, 100 ticks; resolution 0.1 s)",
        "runs": runs,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} ({len(runs)} runs)")


if __name__ == "__main__":
    main()
