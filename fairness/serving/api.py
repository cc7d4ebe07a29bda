"""What every OpenAI-compatible front door of this package shares (`fairness.serve` and `fairness.gateway`):
OpenAI-style errors, bounded JSON bodies, and tenants from an API-keys file."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fairness.extras import missing

try:
    from fastapi import Request
    from fastapi.responses import JSONResponse
except ImportError as e:
    raise missing("serve", e) from e

MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    """An OpenAI-style error: `status`, `message`, `type`, `code`, `param`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0


def load_tenants(path: str) -> dict[str, Tenant]:
    """A JSON object mapping API keys to {"name": ..., "weight": ...} (weight optional, default 1)."""
    try:
        raw = json.loads(open(path, encoding="utf-8").read())
        tenants = {key: Tenant(str(v["name"]), float(v.get("weight", 1.0))) for key, v in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a tenants file ({type(e).__name__}: {e}); expected "
                         '{"<api key>": {"name": "<tenant>", "weight": 1.0}, ...}') from e  # fmt: skip
    if any(t.weight <= 0 for t in tenants.values()):
        raise ValueError(f"{path}: tenant weights must be > 0")
    return tenants


def tenant_of_key(request: Request, tenants: dict[str, Tenant]) -> Tenant:
    """The tenant of the request's bearer API key; 401 when it is missing or unknown."""
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    tenant = tenants.get(key)
    if tenant is None:
        raise ApiError(401, "missing or unknown API key: pass one of the tenants' keys as 'Authorization: Bearer "
                       "<key>'", "invalid_api_key")  # fmt: skip
    return tenant


async def read_json(request: Request) -> dict:
    """The request's body as a JSON object, at most MAX_BODY_BYTES (413 above, 400 when it is not a JSON object)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", "body_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", "body_too_large")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", "invalid_json") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    return body


def is_message(m: object) -> bool:
    """A chat message this package accepts: {role: str, content: str}."""
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def is_int(x: object) -> bool:
    """An integer in JSON's sense (not a boolean)."""
    return isinstance(x, int) and not isinstance(x, bool)


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
