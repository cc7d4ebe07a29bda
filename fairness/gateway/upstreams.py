"""The engines behind the gateway: each one's health (probed), the models it serves and its work in flight, and
the pick of the least-loaded one with room for a model."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from fairness.gateway.limit import ConcurrencyLimit


class UpstreamDown(Exception):
    """The upstream could not take the request (refused, unreachable, 503): no token reached the client."""


class UpstreamFailed(Exception):
    """The upstream answered an error `status` (with its JSON `body`, if any), or broke off (status None)."""

    def __init__(self, message: str, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, body


@dataclass
class Upstream:
    """One OpenAI-compatible engine: its base URL (the /v1 paths are appended), health and load."""

    url: str
    limit: ConcurrencyLimit
    healthy: bool = False
    models: frozenset[str] = frozenset()
    in_flight: int = 0
    served: int = 0

    def room(self) -> int:
        return self.limit.value - self.in_flight if self.healthy else 0


def base_url(url: str) -> str:
    """`http://host:port` or `http://host:port/prefix`, without a trailing slash or /v1."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"upstream {url!r} is not an http(s) URL; pass e.g. --upstream http://127.0.0.1:8001")
    return url.removesuffix("/v1")


class UpstreamPool:
    """The upstreams and the one HTTP client that talks to them. `probe_forever` keeps their health current; a
    request that fails marks its upstream down at once, and probes bring it back."""

    def __init__(
        self,
        urls: list[str],
        limit: int | None = None,
        probe_s: float = 1.0,
        connect_s: float = 2.0,
        read_s: float = 120.0,
        api_key: str | None = None,
    ):
        if not urls:
            raise ValueError("the gateway needs at least one upstream (--upstream URL)")
        if limit is not None and limit < 1:
            raise ValueError(f"the per-upstream limit must be >= 1, got {limit}")
        self.upstreams = [
            Upstream(base_url(u), ConcurrencyLimit(limit, fixed=True, maximum=limit) if limit else ConcurrencyLimit())
            for u in urls
        ]
        if len({u.url for u in self.upstreams}) < len(self.upstreams):
            raise ValueError("an upstream URL is given twice")
        self.probe_s = probe_s
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_s, connect=connect_s),
            headers=headers,
            limits=httpx.Limits(max_connections=4096, max_keepalive_connections=512),
        )

    # --- placement --------------------------------------------------------------------------------------------------

    def pick(self, model: str) -> Upstream | None:
        """The healthy upstream serving `model` with room and the least load (in flight / limit; ties: the one that
        has served least, so idle replicas share the work)."""
        ok = [u for u in self.upstreams if model in u.models and u.room() > 0]
        return min(ok, key=lambda u: (u.in_flight / u.limit.value, u.served + u.in_flight), default=None)

    def has_room(self) -> bool:
        return any(u.room() > 0 for u in self.upstreams)

    def capacity(self) -> int:
        """Requests the healthy upstreams take at once."""
        return sum(u.limit.value for u in self.upstreams if u.healthy)

    def models(self) -> list[str]:
        """Models served by a healthy upstream."""
        return sorted({m for u in self.upstreams if u.healthy for m in u.models})

    def known(self, model: str) -> bool:
        """Some upstream, healthy or not, has served `model`."""
        return any(model in u.models for u in self.upstreams)

    # --- health -----------------------------------------------------------------------------------------------------

    def down(self, up: Upstream) -> None:
        """No new work for `up` until its probes pass."""
        up.healthy = False

    async def probe(self, up: Upstream) -> None:
        """`GET /health`, then `GET /v1/models`: healthy when both answer 200."""
        try:
            r = await self.client.get(up.url + "/health", timeout=self.probe_s * 2)
            m = await self.client.get(up.url + "/v1/models", timeout=self.probe_s * 2) if r.status_code == 200 else r
            ok = r.status_code == 200 and m.status_code == 200
            models = frozenset(d["id"] for d in m.json()["data"]) if ok else up.models
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            ok, models = False, up.models
        up.models, up.healthy = models, ok

    async def probe_forever(self, wake: asyncio.Event) -> None:
        """Probe upstreams that are down every probe_s, healthy ones every 5 x probe_s; sets `wake` after each round
        (an upstream back up may admit waiting requests)."""
        rounds = 0
        while True:
            due = [u for u in self.upstreams if not u.healthy or rounds % 5 == 0]
            await asyncio.gather(*(self.probe(u) for u in due))
            wake.set()
            rounds += 1
            await asyncio.sleep(self.probe_s)

    # --- requests ---------------------------------------------------------------------------------------------------

    async def stream(self, up: Upstream, path: str, body: dict, headers: dict[str, str]) -> AsyncIterator[dict]:
        """POST `body` (asked to stream) to `up`; yields each server-sent event as a JSON object."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    r = await stack.enter_async_context(
                        self.client.stream("POST", up.url + path, json=body, headers=headers)
                    )
                except AttributeError as e:  # httpcore over anyio: a peer that dies while its socket opens
                    raise UpstreamDown(f"{up.url} closed the connection as it opened ({e})") from e
                if r.status_code == 503:
                    raise UpstreamDown(f"{up.url} answered 503")
                if r.status_code != 200:
                    raw = await r.aread()
                    with contextlib.suppress(ValueError):
                        err = json.loads(raw)
                        raise UpstreamFailed(f"{up.url} answered {r.status_code}", r.status_code, err)
                    raise UpstreamFailed(f"{up.url} answered {r.status_code}: {raw[:200]!r}", r.status_code)
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        yield json.loads(data)
                    except ValueError as e:
                        raise UpstreamFailed(f"{up.url} sent an event that is not JSON: {data[:200]!r}") from e
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            raise UpstreamDown(f"{up.url} is unreachable ({type(e).__name__})") from e
        except httpx.HTTPError as e:
            raise UpstreamFailed(f"{up.url} broke off the response ({type(e).__name__}: {e})") from e

    async def aclose(self) -> None:
        await self.client.aclose()
