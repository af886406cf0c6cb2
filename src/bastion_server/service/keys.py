"""API keys: who a key is, what it may do, and the keys made at run time.

Two kinds of key authenticate a request:

* **configured** keys (``--api-key``, ``BASTION_API_KEYS``, the config file's
  ``api_keys``): each is an ``admin`` of a tenant of its own, and cannot be revoked
  through the API (take it out of the configuration);
* **managed** keys, made by ``POST /v1/keys`` (``bastion keys create``): a scope
  (``admin``, ``agent``, ``viewer``) and a tenant.  Only a SHA-256 hash of each is
  stored; the key itself is shown once, when it is made.

A key's **id** is its fingerprint, ``key_`` + the first 24 hex digits of its SHA-256:
what the request log and the audit log name it by.  Its **tenant** is the id whose
sessions it works on: its own id unless it was made for another key's tenant (a viewer
over an agent's sessions, or a key rotated in for one).  Sessions belong to tenants:
to every other tenant they do not exist.

A server without configured keys serves loopback only and answers a request without a
key (or with a key it does not know) as the anonymous admin; a managed key still acts
as itself there.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass

from bastion.wire import ErrorCode, KeyInfo, KeyScope
from bastion_server.service.errors import ServiceError, invalid
from bastion_server.store.sqlite import KeyRecord, Store

ANONYMOUS = "anonymous"
#: Made keys start with this, so that a leaked one is easy to recognise (and scan for).
KEY_PREFIX = "bst_"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def fingerprint(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    #: The key's id (its fingerprint), or ``anonymous``.
    key_id: str
    #: The tenant whose sessions the caller works on.
    owner: str
    scope: KeyScope


ANONYMOUS_PRINCIPAL = Principal(ANONYMOUS, ANONYMOUS, KeyScope.ADMIN)

#: The caller of the request being served (set once it is authenticated), for what
#: records who did something (the audit log); unset in the server's own tasks (the
#: reaper), and inherited by the tasks a request starts (a job's run).
current_principal: ContextVar[Principal | None] = ContextVar("current_principal", default=None)


def match_configured(keys: tuple[str, ...], supplied: str) -> str | None:
    """The configured key equal to ``supplied``, compared in constant time against
    every key every time (the time taken says nothing about a near guess)."""
    given = supplied.encode()
    matched: str | None = None
    for key in keys:
        if hmac.compare_digest(key.encode(), given) and matched is None:
            matched = key
    return matched


def _now() -> str:
    from bastion_server.service.sessions import now_iso

    return now_iso()


class KeyService:
    """The configured keys and the managed ones (kept in memory, written through)."""

    def __init__(self, store: Store, configured: tuple[str, ...]) -> None:
        self.store = store
        self.configured = configured
        #: Live managed keys by hash: authentication is one dict lookup.
        self._live: dict[str, KeyRecord] = {
            k.hash: k for k in store.list_keys() if k.revoked_at is None
        }

    @property
    def open(self) -> bool:
        """Whether requests without a key are served (no configured key)."""
        return not self.configured

    def identify(self, supplied: str | None) -> Principal:
        """The principal for ``supplied``; raises ``unauthorized`` when it is none."""
        if supplied:
            matched = match_configured(self.configured, supplied)
            if matched is not None:
                fp = fingerprint(matched)
                return Principal(fp, fp, KeyScope.ADMIN)
            # A dict lookup by the key's SHA-256: what its time depends on is a hash of
            # the guess, which says nothing about the keys.
            record = self._live.get(key_hash(supplied))
            if record is not None:
                return Principal(record.id, record.tenant, KeyScope(record.scope))
        if self.open:
            return ANONYMOUS_PRINCIPAL
        if not supplied:
            raise ServiceError(
                ErrorCode.UNAUTHORIZED, "an API key is required (Authorization: Bearer <key>)"
            )
        raise ServiceError(ErrorCode.UNAUTHORIZED, "invalid API key")

    # -- management -----------------------------------------------------------------

    def _known_ids(self) -> set[str]:
        return {fingerprint(k) for k in self.configured} | {k.id for k in self.store.list_keys()}

    def create(
        self, scope: str, name: str | None = None, tenant: str | None = None
    ) -> tuple[KeyRecord, str]:
        """A new key of ``scope``; returns its record and the key (shown only now)."""
        try:
            chosen = KeyScope(scope)
        except ValueError:
            raise invalid(
                f"scope must be one of {', '.join(s.value for s in KeyScope)}, not {scope!r}"
            ) from None
        if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise invalid("name must be 1-64 letters, digits, '.', '_' or '-'")
        if name is not None and any(
            k.name == name for k in self.store.list_keys() if k.revoked_at is None
        ):
            raise ServiceError(ErrorCode.INVALID_REQUEST, f"a key named {name!r} exists already")
        if tenant is not None and tenant not in self._known_ids() | {ANONYMOUS}:
            raise invalid(f"tenant {tenant!r} is not the id of a key of this server")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = fingerprint(secret)
        record = KeyRecord(
            id=key_id,
            hash=key_hash(secret),
            name=name,
            scope=chosen.value,
            tenant=tenant or key_id,
            created_at=_now(),
        )
        self.store.insert_key(record)
        self._live[record.hash] = record
        return record, secret

    def list(self) -> list[KeyInfo]:
        """Every key: the configured ones first, then the managed ones, revoked too."""
        infos: list[KeyInfo] = [
            {
                "key_id": fingerprint(k),
                "name": None,
                "scope": "admin",
                "tenant": fingerprint(k),
                "source": "config",
                "created_at": None,
                "revoked_at": None,
            }
            for k in self.configured
        ]
        return infos + [key_view(k) for k in self.store.list_keys()]

    def revoke(self, id_or_name: str) -> KeyInfo:
        """Revoke a managed key by id or name: it is refused from the next request on.

        Its tenant's sessions are kept (a key of that tenant, or an admin made for it,
        can still reach them)."""
        if id_or_name in {fingerprint(k) for k in self.configured}:
            raise invalid(
                f"{id_or_name} is a configured key (--api-key, BASTION_API_KEYS or the "
                "config file): remove it there and restart the server"
            )
        for record in self.store.list_keys():
            if id_or_name in (record.id, record.name) and record.revoked_at is None:
                record.revoked_at = _now()
                self.store.revoke_key(record.id, record.revoked_at)
                self._live.pop(record.hash, None)
                return key_view(record)
        raise ServiceError(ErrorCode.NOT_FOUND, f"no live key with the id or name {id_or_name!r}")


def key_view(record: KeyRecord) -> KeyInfo:
    return {
        "key_id": record.id,
        "name": record.name,
        "scope": record.scope,  # type: ignore[typeddict-item]
        "tenant": record.tenant,
        "source": "api",
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
    }
