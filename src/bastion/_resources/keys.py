"""``bastion.keys``: API keys managed by the server (admin keys only; sync and async)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from .._base import APIRequest, BaseBastion, docs_from, given_fields
from ..wire import CreatedKey, CreateKeyRequest, KeyInfo, KeyList, KeyScopeName

if TYPE_CHECKING:
    from .._client import AsyncBastion, Bastion


def create_key_request(body: CreateKeyRequest) -> APIRequest:
    """``POST /keys``: not idempotent (a repeat would make a second key)."""
    return APIRequest("POST", BaseBastion._url("keys"), json=body, idempotent=False)


def list_keys_request() -> APIRequest:
    return APIRequest("GET", BaseBastion._url("keys"))


def revoke_key_request(key: str) -> APIRequest:
    return APIRequest("DELETE", BaseBastion._url("keys", key))


def create_key_body(scope: str, name: str | None, tenant: str | None) -> CreateKeyRequest:
    body = {"scope": cast(KeyScopeName, scope), **given_fields(name=name, tenant=tenant)}
    return cast(CreateKeyRequest, body)


class Keys:
    """Make, list and revoke the server's API keys (``bastion.keys``).

    Every method needs an ``admin`` key (else :class:`InsufficientScopeError`).  A key
    has a scope: ``"admin"`` (everything, keys included), ``"agent"`` (its tenant's
    sessions, jobs, files and terminals) or ``"viewer"`` (only reads of them: GET
    requests, no terminals).
    """

    def __init__(self, client: Bastion) -> None:
        self._client = client

    def create(
        self, scope: KeyScopeName, *, name: str | None = None, tenant: str | None = None
    ) -> CreatedKey:
        """Make a key.  The result's ``"api_key"`` is the key itself, shown this once:
        the server keeps only its SHA-256 hash.

        Args:
            scope: ``"admin"``, ``"agent"`` or ``"viewer"``.
            name: A unique name (letters, digits, ``.``, ``_``, ``-``; at most 64), to
                revoke it by.
            tenant: The ``key_id`` of the key whose sessions this key works on (a
                viewer of an agent's sessions, a key rotated in); default: sessions of
                its own.

        Returns:
            The new key's ``KeyInfo`` with ``"api_key"``.

        Raises:
            InsufficientScopeError: The client's key is not an admin key.
            InvalidRequestError: Unknown scope, bad or taken name, unknown tenant.
        """
        body = create_key_body(scope, name, tenant)
        return cast(CreatedKey, self._client._request(create_key_request(body)))

    def list(self) -> KeyList:
        """Every key of the server, never the keys themselves: the configured ones
        (``"source": "config"``) and the made ones, revoked ones too.

        Returns:
            ``{"keys": [KeyInfo, ...]}``.
        """
        return cast(KeyList, self._client._request(list_keys_request()))

    def revoke(self, key: str) -> KeyInfo:
        """Revoke a made key, by ``key_id`` or name: refused from its next request on.
        The sessions of its tenant are kept.

        Args:
            key: The key's ``key_id`` or name.

        Returns:
            The key's ``KeyInfo``, with ``revoked_at``.

        Raises:
            NotFoundError: No live key has this id or name.
            InvalidRequestError: It is a configured key (``--api-key``).
        """
        return cast(KeyInfo, self._client._request(revoke_key_request(key)))


@docs_from(Keys)
class AsyncKeys:
    """Make, list and revoke the server's API keys (``bastion.keys``).

    The async twin of :class:`Keys`: the same methods, as coroutines.
    """

    def __init__(self, client: AsyncBastion) -> None:
        self._client = client

    async def create(
        self, scope: KeyScopeName, *, name: str | None = None, tenant: str | None = None
    ) -> CreatedKey:
        body = create_key_body(scope, name, tenant)
        return cast(CreatedKey, await self._client._request(create_key_request(body)))

    async def list(self) -> KeyList:
        return cast(KeyList, await self._client._request(list_keys_request()))

    async def revoke(self, key: str) -> KeyInfo:
        return cast(KeyInfo, await self._client._request(revoke_key_request(key)))
