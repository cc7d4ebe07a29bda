"""An OpenAI-compatible stand-in for an LLM engine with known speed, for the gateway's tests and benches: up to
`max_running` requests decode at once, one token per `step_s` each (the rest queue inside it, first come first
served, as in an engine without fairness); or, with `batch_knee`, every request at once with steps slowing down
past the knee (continuous batching); a prompt takes `prefill_s_per_token` per token. Tokens are "t0 t1 ...".
Its usage reports cached prompt tokens: the longest prefix a recent prompt shared (`PrefixCache`).

    python -m tests.fake_engine --port 8101 --max-running 8 --step-s 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from fairness.serving.api import ApiError, common_params, model_list, openai_app, read_json, usage

MODEL = "fake"


class PrefixCache:
    """The prompts served lately (`size`, newest last); `lookup(text)` is the longest prefix of `text`, in
    characters, that one of them shares, and remembers `text`."""

    def __init__(self, size: int = 64):
        self.size, self._texts = size, []

    def lookup(self, text: str) -> int:
        best = max((len(os.path.commonprefix([text, t])) for t in self._texts), default=0)
        self._texts = [*self._texts[-(self.size - 1) :], text]
        return best


def create_fake_engine(max_running: int = 8, step_s: float = 0.02, prefill_s_per_token: float = 0.0,
                       model: str = MODEL, batch_knee: int | None = None) -> FastAPI:  # fmt: skip
    """batch_knee: batch every request at once, as continuous batching does (max_running then bounds nothing), with
    each step taking step_s x max(1, running / batch_knee): throughput stops rising at the knee while every request
    still starts at once."""
    app = openai_app("fake-engine")
    cache = PrefixCache()
    slots = asyncio.Semaphore(max_running if batch_knee is None else 1 << 30)
    app.state.served = 0  # requests that reached generation
    app.state.running = 0
    app.state.xargs = []  # each request's vllm_xargs, as vLLM would read them (None where it sent none)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return model_list([model], "fake")

    async def serve(request: Request, chat: bool) -> object:
        body = await read_json(request)
        app.state.xargs.append(body.get("vllm_xargs"))
        common = common_params(body, None)
        if common.model != model:
            raise ApiError(404, f"the model {common.model!r} does not exist", "model_not_found", "model")
        n = common.max_tokens or 16
        text = json.dumps(body.get("messages") if chat else body.get("prompt"))
        prompt = max(1, len(text) // 4)
        cached = cache.lookup(text) // 4  # a prefix cache: reported as vLLM and SGLang do
        rid, kind = f"fake-{uuid.uuid4().hex[:12]}", "chat.completion.chunk" if chat else "text_completion"

        def event(i: int, piece: str, reason: str | None) -> dict:
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": piece}
            choice["finish_reason"] = reason
            return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}

        def step() -> float:
            return step_s if batch_knee is None else step_s * max(1.0, app.state.running / batch_knee)

        async def tokens():
            async with slots:
                app.state.served += 1
                app.state.running += 1
                try:
                    await asyncio.sleep(step() + prefill_s_per_token * prompt)
                    for i in range(n):
                        if i:
                            await asyncio.sleep(step())
                        yield event(i, f"t{i} ", "length" if i == n - 1 else None)
                finally:
                    app.state.running -= 1

        if not common.stream:
            async for _ in tokens():  # the same time as streaming
                pass
            text = "".join(f"t{i} " for i in range(n))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "finish_reason": "length"})  # fmt: skip
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                    "model": model, "choices": [choice], "usage": usage(prompt, n, cached)}  # fmt: skip

        async def sse():
            async for e in tokens():
                yield f"data: {json.dumps(e)}\n\n"
            if common.include_usage:
                last = {"id": rid, "object": kind, "choices": [], "usage": usage(prompt, n, cached)}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serve(request, chat=True)

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description="A fake OpenAI-compatible engine of known speed.")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--step-s", type=float, default=0.02)
    ap.add_argument("--prefill-s-per-token", type=float, default=0.0)
    ap.add_argument("--batch-knee", type=int, default=None, help="batch every request; steps slow down past this")
    args = ap.parse_args()
    app = create_fake_engine(args.max_running, args.step_s, args.prefill_s_per_token, batch_knee=args.batch_knee)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
