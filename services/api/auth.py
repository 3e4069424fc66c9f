"""Bearer tokens mapped to tenants. The token comes in `Authorization: Bearer <token>`, or as
`?token=` on GET requests (a browser EventSource cannot set headers)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer

from services.api.settings import ApiConfig

bearer = HTTPBearer(auto_error=False, description="A tenant's (or an admin's) API token.")
query_token = APIKeyQuery(name="token", auto_error=False,
                          description="The same token, for GET requests from a browser.")


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool

    @property
    def scope(self) -> str | None:
        """The tenant whose jobs it sees; None: all."""
        return None if self.admin else self.tenant


def _lookup(cfg: ApiConfig, token: str) -> Principal | None:
    admin = any(hmac.compare_digest(token, t) for t in cfg.admin_tokens)
    tenant = next((v for k, v in cfg.tokens.items() if hmac.compare_digest(token, k)), None)
    if admin:
        return Principal(tenant or "admin", True)
    return Principal(tenant, False) if tenant else None


async def principal(request: Request,
                    creds: HTTPAuthorizationCredentials | None = Depends(bearer),
                    qtoken: str | None = Depends(query_token)) -> Principal:
    cfg: ApiConfig = request.app.state.cfg
    token = creds.credentials if creds else (qtoken if request.method == "GET" else None)
    who = _lookup(cfg, token) if token else None
    if who is None:
        raise HTTPException(401, "missing or unknown bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return who
