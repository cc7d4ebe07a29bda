"""Serve the reference MoE model with its experts offloaded, fairly across clients, and query it with the official
openai client: what `python -m fairness.serve` does, in one script.

    python examples/serve_offloaded.py
"""

from __future__ import annotations

import httpx
from openai import OpenAI

from fairness.serve import BackgroundServer, build_engine
from fairness.serving.server import create_app

MODEL_DIR = "examples/reference-moe"


def main() -> None:
    # A quarter of the experts' bytes on the device; misses computed where the weights live; VTC across clients.
    engine = build_engine(MODEL_DIR, policy="vtc", offload_budget=0.25, offload_options={"miss_path": "host"})
    server = BackgroundServer(create_app(engine), port=8000)
    url = server.start()
    print(f"serving {engine.model_name} on {url}/v1 (VTC, experts offloaded at budget 0.25)")
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        done = client.completions.create(model=engine.model_name, prompt="def fib(n):\n", max_tokens=40, user="alice")
        print("completion for alice:", repr(done.choices[0].text))
        print("streamed chat for bob: ", end="", flush=True)
        for chunk in client.chat.completions.create(model=engine.model_name, stream=True, max_tokens=24, user="bob",
                                                    messages=[{"role": "user", "content": "import os\n"}]):  # fmt: skip
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()
        metrics = httpx.get(f"{url}/metrics").text
        print("\n".join(line for line in metrics.splitlines() if line.startswith(("fairness_client_service_total",
                                                                                 "offload_"))))  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()
