"""Request bodies: a size cap enforced before anything parses them, and job configs as JSON
or YAML."""

from __future__ import annotations

import json
from typing import Any

import yaml
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nebula.config.load import ConfigError

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without aliases: `*a` references can blow a small body up into a huge tree
    (billion laughs); a job config never needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("YAML aliases (*name) are not allowed")
        return super().compose_node(parent, index)


class BodyLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, else while reading a
    streamed (chunked) body. The app then gets the body already read, in one message."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def parse_config_body(body: bytes, content_type: str | None) -> Any:
    """The body as data: JSON for application/json, YAML for the YAML types, else whichever
    it parses as. Errors are ConfigErrors (422)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("body is not UTF-8 text", [
            {"field": "<body>", "message": "not UTF-8 text", "type": "decode"}]) from None
    if not text.strip():
        raise ConfigError("empty body: send a job config", [
            {"field": "<body>", "message": "empty; send a job config", "type": "missing"}])
    try:
        if ctype == "application/json" or (ctype not in YAML_TYPES and text.lstrip()[:1] in "{["):
            return json.loads(text)
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - safe loader
    except (json.JSONDecodeError, yaml.YAMLError, RecursionError, ValueError) as e:
        kind = "JSON" if ctype == "application/json" else "YAML"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"body is not valid {kind}: {msg}", [
            {"field": "<body>", "message": f"not valid {kind}: {msg}", "type": "parse"}]) from None
