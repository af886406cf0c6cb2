"""/v1/keys: make, list and revoke API keys (admin keys only; see api/auth.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from bastion.wire import CreatedKey, CreateKeyRequest, KeyInfo, KeyList
from bastion_server.api.auth import principal
from bastion_server.api.deps import services
from bastion_server.service.container import Services
from bastion_server.service.keys import Principal, key_view

router = APIRouter(prefix="/v1/keys", tags=["keys"])
Caller = Annotated[Principal, Depends(principal)]
Svc = Annotated[Services, Depends(services)]


@router.post("", status_code=201, response_model=CreatedKey)
async def create_key(body: CreateKeyRequest, who: Caller, svc: Svc) -> CreatedKey:
    """Make a key of a scope (``admin``, ``agent``, ``viewer``).  The answer holds the
    key itself, this once: only its SHA-256 hash is stored."""
    record, secret = svc.keys.create(body["scope"], body.get("name"), body.get("tenant"))
    svc.audit.record("key_create", target=record.id, scope=record.scope, name=record.name)
    return {**key_view(record), "api_key": secret}


@router.get("", response_model=KeyList)
async def list_keys(who: Caller, svc: Svc) -> KeyList:
    """Every key: the configured ones (``source: "config"``), then the made ones,
    revoked ones too (with ``revoked_at``).  Never the keys themselves."""
    return {"keys": svc.keys.list()}


@router.delete("/{key}", response_model=KeyInfo)
async def revoke_key(key: str, who: Caller, svc: Svc) -> KeyInfo:
    """Revoke a made key, by id or name: refused (401) from the next request on.  The
    sessions of its tenant are kept."""
    info = svc.keys.revoke(key)
    svc.audit.record("key_revoke", target=info["key_id"], name=info["name"])
    return info
