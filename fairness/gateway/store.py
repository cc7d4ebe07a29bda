"""The fleet's shared store: a Redis or Valkey server that every gateway of a fleet shares (`SharedState`, its
scripts in `scripts/*.lua`), and the queue of a gateway's calls to it (`StoreQueue`), sent one at a time from a task of
their own, so that nothing on the gateway's event loop waits for the store.

Each call is one server-side script, so each is atomic and one round trip. Charges carry a sequence number per
gateway process (`incarnation`), and the store applies each at most once: a batch whose reply was lost is re-sent
without charging twice. Scripts touch keys they compute: a single Redis or Valkey, not a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files

from fairness.extras import missing

try:
    import redis
    import redis.asyncio
except ImportError as e:
    raise missing("fleet", e) from e

HEARTBEAT_TTL_S = 2.0  # a gateway silent this long leaves the fleet's counts
RETRY_S = 1.0  # after a store error, how long a gateway serves on local counters before it tries again
TIMEOUT_S = 0.25  # a store call slower than this counts as the store being unreachable
log = logging.getLogger("fairness.gateway.fleet")
SEP = "\x1f"  # between model and tenant in a waiting field (the ASCII unit separator: in no model id)
STORE_ERRORS = (redis.RedisError, OSError)  # OSError covers asyncio's TimeoutError


def _script(name: str) -> str:
    scripts = files("fairness.gateway") / "scripts"
    return (scripts / "common.lua").read_text() + "\n" + (scripts / f"{name}.lua").read_text()


def _flat(pairs: dict) -> list:
    return [len(pairs)] + [x for kv in pairs.items() for x in kv]


def waiting_field(model: str, tenant: str) -> str:
    """The field of a waiting count in the store: one per (model, tenant) waiting at a gateway."""
    return f"{model}{SEP}{tenant}"


@dataclass(frozen=True)
class Beat:
    """A heartbeat's answer: `state` 1 when this gateway's counts were written, 0 when the fleet knows it, -1 when it
    does not (heartbeat again with force); and the last admission this process was charged for (sequence number,
    tenant, amount), so that one whose reply was lost can be refunded; and the live gateways in the fleet."""

    state: int
    admit_seq: int
    admit_tenant: str
    admit_charge: float
    gateways: int


class SharedState:
    """The fleet's store: a Redis or Valkey server at `url` (redis://HOST:PORT[/DB]), keys under `prefix`. A gateway
    calls it through its `StoreQueue` only, one call at a time."""

    def __init__(self, url: str, gateway_id: str | None = None, prefix: str = "fairness:"):
        try:
            self.client = redis.asyncio.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        except ValueError as e:
            raise ValueError(f"--state {url!r} is not a store URL; use redis://HOST:PORT") from e
        self.url, self.prefix = url, prefix
        self.gateway = gateway_id or uuid.uuid4().hex[:12]
        self.incarnation = uuid.uuid4().hex[:12]  # this process: a restart with the same id starts a new sequence
        self.epoch = 0  # forced heartbeats so far: a call sent before the latest one is stale
        self._heartbeat, self._join, self._admit, self._apply = (
            self.client.register_script(_script(name)) for name in ("heartbeat", "join", "admit", "apply")
        )

    def _head(self) -> list:
        return [self.prefix, self.gateway, self.incarnation, self.epoch]

    async def heartbeat(
        self, waiting: dict[str, int], in_flight: dict[str, int], force: bool = False, idle_s: float = 600.0
    ) -> Beat:
        """Refresh this gateway's heartbeat and forget tenants unseen for `idle_s`. With `force`, write its counts
        anew (`waiting`, waiting field -> requests; `in_flight`, upstream -> requests) in a new epoch: the calls sent
        before it are stale, and the store refuses those that arrive late."""
        self.epoch += force
        args = self._head() + [int(HEARTBEAT_TTL_S * 1000), int(force), int(idle_s * 1000)]
        state, seq, tenant, amount, gateways = await self._heartbeat(args=args + _flat(waiting) + _flat(in_flight))
        return Beat(int(state), int(seq), _text(tenant), float(amount), int(gateways))

    async def join(self, model: str, tenant: str) -> bool:
        """One more request of `tenant` waits here for `model` (lifting its counter if it joins that backlog); False
        when the call was stale (heartbeat with force)."""
        return bool(await self._join(args=self._head() + [model, tenant]))

    async def admit(
        self, seq: int, groups: dict[str, tuple[dict[str, float], dict[str, int]]]
    ) -> tuple[list[str], dict[str, float]]:
        """One admission round: groups, model -> (heads: tenant -> the prompt charge of its first request waiting
        here for that model; rooms: upstream serving it -> its limit). Returns the decision (['admit', model, tenant,
        upstream], ['none'] or ['gone']) and the heads' tenants' counters."""
        args = self._head() + [seq, len(groups)]
        for model, (heads, rooms) in groups.items():
            args += [model] + _flat(heads) + _flat(rooms)
        decision, counters = await self._admit(args=args)
        pairs = [_text(x) for x in counters]
        return [_text(d) for d in decision], {t: float(c) for t, c in zip(pairs[::2], pairs[1::2], strict=True)}

    async def apply(
        self, seq: int, charges: dict[str, float], waiting: dict[str, int], in_flight: dict[str, int]
    ) -> int:
        """Add charges to counters and these changes to this gateway's waiting and in-flight counts, once per `seq`;
        wakes the fleet when something left an upstream. Returns 1 (applied), 0 (applied before) or -1 (stale:
        nothing applied; heartbeat with force)."""
        args = self._head() + [seq] + _flat(charges) + _flat(waiting) + _flat(in_flight)
        return int(await self._apply(args=args))

    async def listen(self, on_message: Callable[[], None]) -> None:
        """Calls `on_message()` on every finish in the fleet, resubscribing after an outage, until cancelled."""
        # its own connection, which waits for messages as long as it takes (the client's timeout is for calls)
        listener = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=TIMEOUT_S, health_check_interval=5)
        try:
            while True:
                try:
                    async with listener.pubsub(ignore_subscribe_messages=True) as sub:
                        await sub.subscribe(self.prefix + "room")
                        while True:
                            if await sub.get_message(ignore_subscribe_messages=True, timeout=1.0) is not None:
                                on_message()
                except STORE_ERRORS:
                    await asyncio.sleep(RETRY_S)
        finally:
            await listener.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class Skipped(Exception):
    """A store call not sent: an earlier call failed, and no heartbeat has reached the store since."""


class StoreQueue:
    """A gateway's calls to its `SharedState`, one at a time in the order submitted, in a task of their own on the
    event loop: nothing on the loop waits for the store. Each call's `done(result, error)` runs when it is answered.
    After a failure the calls queued behind it are not sent (`Skipped`: certainly not applied) until a `probe` call
    (a heartbeat) succeeds."""

    def __init__(self) -> None:
        self._calls: asyncio.Queue = asyncio.Queue()
        self._broken = False
        self.submitted = 0  # calls submitted so far
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fairness-fleet-store")

    def submit(self, fn: Callable, args: tuple, done: Callable[[object, Exception | None], None], probe=False) -> None:
        """`fn(*args)` (a coroutine function) in its turn; `probe`: sent even after a failure."""
        self.submitted += 1
        self._calls.put_nowait((fn, args, done, probe))

    async def drained(self) -> None:
        """Returns once every call submitted so far, and every call their answers submitted, has been answered."""
        while True:
            before, answered = self.submitted, asyncio.get_running_loop().create_future()
            self.submit(_nothing, (), lambda *_, f=answered: f.done() or f.set_result(None))
            await answered
            if self.submitted == before + 1:
                return

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            fn, args, done, probe = await self._calls.get()
            result, error = None, None
            if self._broken and not probe:
                error = Skipped()
            else:
                try:
                    result = await fn(*args)
                    self._broken = False
                except STORE_ERRORS as e:
                    error, self._broken = e, True
            try:
                done(result, error)
            except Exception:  # a bug in the gateway's handling must not stop every later store call
                log.exception("fleet: handling the store's answer to %s failed", getattr(fn, "__name__", fn))


async def _nothing() -> None:
    return None
