"""A baseline miss policy: FreeToken's rule (arXiv 2608.16157, as its abstract states it), for the bench beside
`miss_path="auto"`. Each layer call's misses are split between the link and the host in proportion to the two
bandwidths as measured while decoding (the link on every copy, the host on every job), and the host takes any only
when its bandwidth is above twice the link's.

    patch(model, budget, miss_path=FreeTokenSplit)
"""

from __future__ import annotations

from collections.abc import Callable

from offload_moe.runtime.miss_router import MissPolicy

HOST_OVER_LINK = 2.0  # the host takes a share only when its bandwidth exceeds this multiple of the link's


class FreeTokenSplit(MissPolicy):
    """Misses, most tokens first, go to the host in the share host bandwidth / (host + link bandwidth)."""

    name = "freetoken-split"

    def split(self, tokens: dict[int, int], admit: Callable[[int], bool] = lambda e: True) -> tuple[set[int], set[int]]:
        expert_bytes = self.host.store.expert_bytes()
        copy_s, host_s = self.engine.copy_seconds(), self.fit.seconds(1)
        link_bw = expert_bytes / copy_s if copy_s else float("inf")
        host_bw = expert_bytes / host_s if host_s > 0 else float("inf")
        order = sorted(tokens, key=lambda e: (-tokens[e], e))
        n_host = 0 if host_bw <= HOST_OVER_LINK * link_bw else round(len(order) * host_bw / (host_bw + link_bw))
        host = set(order[len(order) - n_host :]) if n_host else set()  # the host takes the fewest tokens
        copy = set(order) - host
        self.counters.auto_host += len(host)
        self.counters.auto_copy += len(copy)
        return copy, host
