"""Fairness inside vLLM: a scheduler plug-in (`--scheduler-cls fairness.vllm.FairScheduler`) whose waiting queue a
`fairness` policy orders. Imported only when asked: it needs vLLM (`pip install "offload-moe[vllm]"` where vLLM is)."""

from fairness.vllm.scheduler import FairAsyncScheduler, FairQueue, FairScheduler, Settings

__all__ = ["FairAsyncScheduler", "FairQueue", "FairScheduler", "Settings"]
