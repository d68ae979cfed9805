"""Who may call the retriever: an API key, and the rule that an endpoint reachable beyond
loopback is never anonymous by accident.

The key is a secret, so no config holds it: `serve.api_key_file` names a file that holds
it (a mounted Kubernetes secret, or a file only its owner can read), else the environment
variable `GPA_RAY_API_KEY` of the process that builds the API (on Serve: the ingress
replica, which inherits its node's environment). Clients send it as
`Authorization: Bearer <key>` or `X-API-Key: <key>`; it is compared in constant time.

With a key every route needs it except liveness, the search page and the API docs (a
load balancer's probe and a browser opening the page carry no key). Without one the API
is open, but `POST /v1/index/reload` is refused: switching what is served always needs
the key. `check_exposure` refuses to serve on a non-loopback `serve.host` without a key
unless `serve.allow_anonymous` says so explicitly.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import Request, Response

from gpa_ray.config import ServeConfig
from gpa_ray.serve.errors import error_response

API_KEY_ENV = "GPA_RAY_API_KEY"
RELOAD_PATH = "/v1/index/reload"
OPEN_PATHS = frozenset({"/healthz", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
"""Routes answered without a key (liveness, the page, the API docs)."""


class ServeSecurityError(RuntimeError):
    """The retriever would be reachable beyond loopback without a key, or its key file
    cannot be read."""


def load_api_key(serve_cfg: ServeConfig) -> str | None:
    """The API key: the contents of `serve.api_key_file`, else `GPA_RAY_API_KEY`, else None."""
    if serve_cfg.api_key_file:
        path = Path(serve_cfg.api_key_file)
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ServeSecurityError(f"serve.api_key_file {path}: cannot read it ({exc})") from exc
        if not key:
            raise ServeSecurityError(f"serve.api_key_file {path} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it resolves to wherever DNS says
        return False


def check_exposure(serve_cfg: ServeConfig, key: str | None) -> None:
    """Refuse a non-loopback `serve.host` without a key unless `serve.allow_anonymous`."""
    if key is None and not serve_cfg.allow_anonymous and not is_loopback(serve_cfg.host):
        raise ServeSecurityError(
            f"serve.host {serve_cfg.host} is reachable beyond this machine and no API key is "
            f"set: set serve.api_key_file (or {API_KEY_ENV}), or serve.allow_anonymous=true "
            "to serve without one"
        )


def presented_key(request: Request) -> str:
    """The key a request carries (Bearer token or X-API-Key), "" if none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key", "")


def api_key_gate(
    key: str | None,
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """HTTP middleware enforcing `key` (see the module docstring)."""

    async def gate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if path in OPEN_PATHS:
            return await call_next(request)
        if key is None:
            if path == RELOAD_PATH:
                return error_response(
                    403,
                    "forbidden",
                    f"reloading the index needs an API key: set serve.api_key_file (or "
                    f"{API_KEY_ENV}) where the service runs",
                )
            return await call_next(request)
        if not hmac.compare_digest(presented_key(request).encode(), key.encode()):
            response = error_response(
                401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)"
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await call_next(request)

    return gate
