"""`python -m fairness.serve MODEL_PATH`: a fair, multi-tenant, OpenAI-compatible endpoint for a (possibly offloaded)
Mixture-of-Experts model, on transformers' continuous batching with a fairness policy as its scheduler.

    python -m fairness.serve examples/reference-moe --policy vtc --offload-budget 0.25 --port 8000
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fairness.extras import missing

try:
    import uvicorn
except ImportError as e:
    raise missing("serve", e) from e

from fairness.core.equinox import Equinox
from fairness.core.policy import SchedulingPolicy, policy_names
from fairness.core.predictor import OnnxPredictor
from fairness.serving.api import load_tenants
from fairness.serving.engine import ServingEngine
from fairness.serving.server import create_app
from offload_moe.options import PREFETCH_DEFAULT, PREFETCHERS, STANDINS


def build_engine(
    model_path: str | Path,
    policy: str = "vtc",
    device: str | None = None,
    offload_budget: float | str | None = None,
    offload_options: dict | None = None,
    max_running: int = 16,
    max_batch_tokens: int = 256,
    mope: str | Path | None = None,
    model_name: str | None = None,
) -> ServingEngine:
    """Load the model (memory-mapped experts when offloaded, through `offload_moe.load`) and its engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    if policy not in policy_names():
        raise ValueError(f"unknown policy {policy!r}; registered: {policy_names()}")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    handle = None
    dtype = torch.float32 if dev == "cpu" else None  # CPUs without native bf16 are far faster in float32
    if offload_budget is not None:
        import offload_moe

        model, handle = offload_moe.load(
            path, budget=offload_budget, device=dev, dtype=dtype, **(offload_options or {})
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(dev)
    model.eval()
    factory: str | Callable[[], SchedulingPolicy] = policy
    if policy == "equinox" and mope is not None:
        predictor = OnnxPredictor(mope)
        factory = lambda: Equinox(predictor=predictor)  # noqa: E731
    return ServingEngine(
        model, tokenizer, model_name or path.name, factory, max_running, max_batch_tokens, offload=handle
    )


class BackgroundServer:
    """uvicorn serving an app in a thread (for tests, examples and the benchmark); `stop()` drains and joins."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="fairness-serve", daemon=True)

    def start(self, timeout_s: float = 60.0) -> str:
        """Start and wait until it listens; returns its base URL."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Drain and join; nothing to do when it was never started."""
        self.server.should_exit = True
        if self.thread.ident is not None:
            self.thread.join()


def _name(prefetch: str | None) -> str:
    return "none" if prefetch is None else prefetch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve a model fairly over an OpenAI-compatible HTTP API.")
    ap.add_argument("model", type=Path, help="a model directory (safetensors checkpoint)")
    ap.add_argument("--policy", default="vtc", help=f"scheduling policy, one of {policy_names()}")
    ap.add_argument("--mope", type=Path, help="a MoPE .onnx file for --policy equinox")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--offload-budget", default=None, help="offload experts: a fraction (0.25) or a size (6GiB)")
    ap.add_argument("--offload-miss-path", default=None, choices=["fetch", "host", "auto"])
    ap.add_argument("--offload-standin", default=None, choices=[k for k in STANDINS if k is not None])
    ap.add_argument("--offload-bits", type=int, default=None, help="bits per weight of 'quant'/'lowbit' stand-ins")
    ap.add_argument(
        "--offload-prefetch",
        default=_name(PREFETCH_DEFAULT),
        choices=[_name(p) for p in PREFETCHERS],
        help="offload_moe's prefetcher (default: the library's, %(default)s)",
    )
    ap.add_argument("--offload-calibration", type=Path, default=None)
    ap.add_argument("--max-running", type=int, default=16, help="requests running at once")
    ap.add_argument("--max-batch-tokens", type=int, default=256, help="tokens per engine step")
    ap.add_argument("--max-tokens-limit", type=int, default=512, help="the largest max_tokens a request may ask for")
    ap.add_argument("--tenants", type=Path, help='JSON: {"<api key>": {"name": "<tenant>", "weight": 1.0}}')
    ap.add_argument("--model-name", default=None, help="the model name clients use (default: the directory name)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    if args.max_running < 1 or args.max_batch_tokens < 1 or args.max_tokens_limit < 1:
        raise SystemExit("--max-running, --max-batch-tokens and --max-tokens-limit must be >= 1")
    budget = args.offload_budget
    if budget is not None:
        try:
            budget = float(budget)
        except ValueError:
            pass  # a size such as "6GiB"
    options = {
        "miss_path": args.offload_miss_path,
        "standin": args.offload_standin,
        "prefetch": None if args.offload_prefetch == "none" else args.offload_prefetch,
        "calibration": args.offload_calibration,
    }
    if args.offload_bits is not None:
        options["bits"] = args.offload_bits
    try:
        tenants = load_tenants(str(args.tenants)) if args.tenants else None
        engine = build_engine(
            args.model,
            args.policy,
            args.device,
            budget,
            options,
            args.max_running,
            args.max_batch_tokens,
            args.mope,
            args.model_name,
        )
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise SystemExit(str(e)) from e
    app = create_app(engine, tenants, args.max_tokens_limit)
    print(f"serving {engine.model_name} under {args.policy} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
