"""The serving engine behind `fairness.serve`: a (possibly offloaded) model on transformers' continuous batching,
scheduled by a fairness policy, with per-request streaming and Prometheus metrics.

One `ServingEngine` owns the model's continuous-batching manager, the client directory the scheduler reads, and the
metrics; the HTTP layer (`fairness.serving.server`) only translates requests and responses.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from fairness.extras import missing

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError as e:
    raise missing("serve", e) from e
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from fairness.core.driver import require_no_oracle
from fairness.core.policy import SchedulingPolicy
from fairness.core.service import service
from fairness.core.telemetry import Telemetry
from fairness.serving.cb_scheduler import (
    Client,
    ClientDirectory,
    policy_factory,
    register_scheduler,
    unregister_scheduler,
)


@dataclass
class StreamUpdate:
    """What a request produced so far: its generated token ids and whether (and why) it finished."""

    tokens: list[int]
    finished: bool
    finish_reason: str | None  # "stop" (end of sequence), "length" (max_tokens) or "error"
    error: str | None = None


class _Metrics:
    """The Prometheus view of the engine; one registry per engine, so several servers can live in one process."""

    def __init__(self, engine: ServingEngine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.service = Counter(
            "fairness_client_service", "weighted tokens served ((input + 2 output) / weight)", ["client"], registry=r
        )
        self.requests = Counter("fairness_requests", "finished requests by outcome", ["client", "outcome"], registry=r)
        self.tokens = Counter("fairness_generated_tokens", "tokens generated", registry=r)
        self.queued = Gauge("fairness_requests_queued", "requests waiting to be admitted", registry=r)
        self.running = Gauge("fairness_requests_running", "requests admitted and not finished", registry=r)
        self.tokens_per_s = Gauge(
            "fairness_tokens_per_second", "tokens generated per second over the last 10 s", registry=r
        )
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("fairness_ttft_seconds", "time to first token", ["client"], buckets=buckets, registry=r)
        self.itl = Histogram(
            "fairness_inter_token_seconds", "time between streamed tokens", buckets=buckets, registry=r
        )
        r.register(_OffloadCollector(engine))
        self._recent: list[tuple[float, int]] = []

    def generated(self, n: int) -> None:
        now = time.monotonic()
        self.tokens.inc(n)
        self._recent = [(t, k) for t, k in self._recent if t > now - 10] + [(now, n)]
        span = max(now - self._recent[0][0], 1e-3)
        self.tokens_per_s.set(sum(k for _, k in self._recent) / max(span, 1.0))


class _OffloadCollector:
    """The offload runtime's counters at scrape time, named and labelled as vLLM's `vllm:` series are
    (`offload_moe:` prefix, a `model_name` label; counters end in `_total`); hits and misses also per MoE layer."""

    def __init__(self, engine: ServingEngine):
        self.engine = engine

    def collect(self):
        handle = self.engine.offload
        if handle is None:
            return
        s, model = handle.stats(), self.engine.model_name
        rate = GaugeMetricFamily(
            "offload_moe:expert_hit_rate", "share of routed experts found resident", labels=["model_name"]
        )
        rate.add_metric([model], s.hit_rate)
        yield rate
        for name, value, doc in (
            ("expert_hits", s.hits, "routed experts already resident (or being copied) when their layer ran"),
            ("expert_misses", s.misses, "routed experts not resident when their layer ran"),
            ("bytes_copied", s.bytes_copied, "expert bytes copied to the device"),
            ("host_experts", s.host_experts, "missed experts computed on the host"),
            ("stall_seconds", s.stall_seconds, "seconds compute waited for expert copies"),
            ("link_seconds", s.link_seconds, "seconds the link (or disk) was busy copying experts"),
        ):
            family = CounterMetricFamily(f"offload_moe:{name}", doc, labels=["model_name"])
            family.add_metric([model], float(value))
            yield family
        for name, attr in (("layer_expert_hits", "hits"), ("layer_expert_misses", "misses")):
            family = CounterMetricFamily(f"offload_moe:{name}", f"{attr} per MoE layer", labels=["model_name", "layer"])
            for layer in s.per_layer:
                family.add_metric([model, str(layer.layer)], float(getattr(layer, attr)))
            yield family


class ServingEngine:
    """A model served by continuous batching under a fairness policy.

    policy: a registered policy name or a factory of fresh `SchedulingPolicy` instances. max_running: requests
    running at once. offload: the model's `OffloadHandle` when it is patched (its counters become metrics).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        model_name: str,
        policy: str | Callable[[], SchedulingPolicy] = "vtc",
        max_running: int = 16,
        max_batch_tokens: int = 256,
        kv_blocks: int | None = None,
        offload=None,
        telemetry: Telemetry | None = None,
    ):
        require_no_oracle(policy_factory(policy)())  # before anything starts
        self.model, self.tokenizer, self.model_name, self.offload = model, tokenizer, model_name, offload
        text_config = model.config.get_text_config()
        self.context_length = int(text_config.max_position_embeddings)
        self.vocab_size = int(text_config.vocab_size)
        self.clients = ClientDirectory()
        self.metrics = _Metrics(self)
        self.telemetry = telemetry or Telemetry(nvml=False if model.device.type == "cpu" else None).start()
        self.steps: list[tuple[int, int, int, float]] = []  # measured engine steps (for EngineModel.fit)
        self.scheduler_type = register_scheduler(
            policy, self.clients, self.telemetry, max_running=max_running, steps=self.steps
        )
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
        generation = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=eos)
        blocks = kv_blocks or max(8, (max_running * self.context_length) // 256 // 4)
        cb = ContinuousBatchingConfig(
            scheduler_type=self.scheduler_type,
            max_requests_per_batch=max_running,
            max_batch_tokens=max_batch_tokens,
            num_blocks=blocks,
        )
        self.manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=cb)
        self.max_running, self.max_batch_tokens = max_running, max_batch_tokens
        self._live: dict[str, Client] = {}
        self.accepting = False

    def start(self) -> None:
        self.manager.start()
        self.accepting = True

    def stop(self, drain_s: float = 30.0) -> None:
        """Stop accepting, let what is in flight finish for up to `drain_s` seconds, then cancel the rest."""
        self.accepting = False
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=drain_s)
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=10.0, hard_stop=True)
        self.telemetry.stop()
        unregister_scheduler(self.scheduler_type)

    def engine_model(self):
        """The engine as the simulator models it: this cache's KV tokens, the step budget, the running cap, and step
        times fitted to the steps measured so far (call while it runs)."""
        from fairness.core.engine_model import EngineModel

        kv = self.manager.batch_processor.cache.max_tokens_read
        capacity = {"kv_tokens": kv, "max_step_tokens": self.max_batch_tokens, "max_running": self.max_running}
        return EngineModel.fit(self.steps, **capacity) if len(self.steps) >= 4 else EngineModel(**capacity)

    @property
    def healthy(self) -> bool:
        return self.accepting and self.manager.is_running()

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The model's chat template, or a plain "role: content" transcript when it has none."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode_prompt(text)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def submit(self, input_ids: list[int], client: Client, max_tokens: int, ignore_eos: bool = False) -> Stream:
        """Queue a request; iterate the returned `Stream` for its progress, and close it when done (or gone).
        ignore_eos: generate exactly max_tokens tokens (for load tests that replay known output lengths)."""
        request_id = f"req-{uuid.uuid4().hex}"
        stream = Stream(self, request_id, client, len(input_ids), max_tokens)
        self.clients.register(request_id, client)
        self.manager.register_result_handler(request_id, stream.queue.put_nowait)
        self.manager.add_request(
            input_ids,
            request_id=request_id,
            max_new_tokens=max_tokens,
            streaming=True,
            eos_token_id=-1 if ignore_eos else None,
        )
        self._live[request_id] = client
        self._update_gauges()
        return stream

    def _closed(self, stream: Stream) -> None:
        if not stream.finished:
            self.manager.cancel_request(stream.request_id)  # frees its KV cache
        self._live.pop(stream.request_id, None)
        self.metrics.requests.labels(stream.client.name, stream.outcome).inc()
        self._update_gauges()

    def occupancy(self) -> dict[str, float]:
        """What the engine holds now: streams open, requests in the scheduler (running, waiting) and the share of
        the KV cache that is free (1.0 when nothing holds a block)."""
        processor = self.manager.batch_processor
        if processor is None:
            return {"streams": float(len(self._live)), "running": 0.0, "waiting": 0.0, "kv_free": 1.0}
        scheduler = processor.scheduler
        return {
            "streams": float(len(self._live)),
            "running": float(len(scheduler.active_requests)),
            "waiting": float(len(scheduler.waiting_requests)),
            "kv_free": float(processor.cache.compute_free_capacity()),
        }

    def _update_gauges(self) -> None:
        processor = self.manager.batch_processor
        scheduler = processor.scheduler if processor is not None else None
        active = scheduler.active_requests if scheduler is not None else {}
        running = sum(1 for rid in self._live if rid in active)  # a closed stream stops counting at once
        self.metrics.running.set(running)
        self.metrics.queued.set(max(0, len(self._live) - running))


class Stream:
    """One request's progress: `async for update in stream` yields a `StreamUpdate` per token; `close()`
    (synchronous, safe from a cancelled task) cancels the request if it is still running."""

    def __init__(self, engine: ServingEngine, request_id: str, client: Client, prompt_len: int, max_tokens: int):
        self.engine, self.request_id, self.client = engine, request_id, client
        self.prompt_len, self.max_tokens = prompt_len, max_tokens
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished, self.outcome, self._closed = False, "cancelled", False
        self._start = self._last = time.monotonic()
        self._seen = 0

    async def __aiter__(self) -> AsyncIterator[StreamUpdate]:
        m, client = self.engine.metrics, self.client
        while not self.finished:
            out = await self.queue.get()
            self.finished = out.is_finished()
            new = len(out.generated_tokens) - self._seen
            if new > 0:
                now = time.monotonic()
                if self._seen == 0:
                    m.ttft.labels(client.name).observe(now - self._start)
                    m.service.labels(client.name).inc(service(self.prompt_len, 0, client.weight))
                else:
                    m.itl.observe(now - self._last)
                self._last, self._seen = now, len(out.generated_tokens)
                m.generated(new)
                m.service.labels(client.name).inc(service(0, new, client.weight))
            if out.error is not None:
                self.outcome = "error"
                yield StreamUpdate(list(out.generated_tokens), True, "error", out.error)
                return
            reason = None
            if self.finished:
                self.outcome = "ok"
                reason = "length" if len(out.generated_tokens) >= self.max_tokens else "stop"
            yield StreamUpdate(list(out.generated_tokens), self.finished, reason)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine._closed(self)
