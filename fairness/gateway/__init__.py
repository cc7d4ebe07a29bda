"""A fair gateway in front of any OpenAI-compatible engines (vLLM, SGLang, `fairness.serve`, `transformers serve`):
per-tenant queues, one policy counter for every replica, admission into the least-loaded upstream with room.

    python -m fairness.gateway --upstream http://10.0.0.1:8000 --upstream http://10.0.0.2:8000 --policy vtc
"""

from fairness.gateway.app import GatewayConfig, create_gateway
from fairness.gateway.limit import ConcurrencyLimit

__all__ = ["ConcurrencyLimit", "GatewayConfig", "create_gateway"]
