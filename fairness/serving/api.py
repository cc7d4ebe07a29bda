"""What every OpenAI-compatible front door of this project shares (`fairness.serve`, `fairness.gateway` and the lab's
fake engine): the app with its OpenAI-style errors, bounded JSON bodies, the parameters every request is checked for
alike, the model list, and tenants from an API-keys file."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fairness.extras import missing

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
except ImportError as e:
    raise missing("serve", e) from e

MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    """An OpenAI-style error: `status`, `message`, `type`, `code`, `param`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type_: str = "invalid_request_error",
    ):
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
        raise ValueError(
            f"{path}: not a tenants file ({type(e).__name__}: {e}); expected "
            '{"<api key>": {"name": "<tenant>", "weight": 1.0}, ...}'
        ) from e
    if any(t.weight <= 0 for t in tenants.values()):
        raise ValueError(f"{path}: tenant weights must be > 0")
    return tenants


def tenant_of_key(request: Request, tenants: dict[str, Tenant]) -> Tenant:
    """The tenant of the request's bearer API key; 401 when it is missing or unknown."""
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    tenant = tenants.get(key)
    if tenant is None:
        raise ApiError(
            401,
            "missing or unknown API key: pass one of the tenants' keys as 'Authorization: Bearer <key>'",
            "invalid_api_key",
        )
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


def usage(prompt: int, completion: int, cached: int | None = None) -> dict:
    """OpenAI's `usage`; cached: prompt tokens an engine's prefix cache served (vLLM and SGLang report them)."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def openai_app(title: str, lifespan: object = None) -> FastAPI:
    """A FastAPI app whose `ApiError`s answer in OpenAI's error shape."""
    app = FastAPI(title=title, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    return app


def model_list(models: list[str], owned_by: str) -> dict:
    """The body of GET /v1/models."""
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": owned_by} for m in models],
    }


@dataclass(frozen=True)
class Common:
    """The parameters every front door checks alike."""

    model: str
    max_tokens: int | None  # None: not given
    stream: bool
    include_usage: bool  # stream_options.include_usage


def common_params(body: dict, max_tokens_limit: int | None) -> Common:
    """`body`'s model, max_tokens (max_completion_tokens wins; in [1, limit]), stream and stream_options, or an
    ApiError 400 that names the parameter."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: one of GET /v1/models", "missing_model", "model")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    limit = max_tokens_limit
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1 or (limit and max_tokens > limit)):
        raise ApiError(
            400,
            f"max_tokens must be an integer in [1, {limit or 'the model context'}], got {max_tokens!r}",
            "invalid_value",
            "max_tokens",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "invalid_value", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "invalid_value", "stream_options")
    return Common(model, max_tokens, stream, bool(options.get("include_usage")))
