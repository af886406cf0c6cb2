"""The sync and async clients cannot drift: same methods, same arguments, same results.

For every public member of the sync client and of each sub-API (sessions, jobs,
files, terminal, a terminal itself, a job event stream), the async twin has a member
of the same name with the same parameters (names, kinds, defaults, annotations once
the async type names are read as their sync twins) that is a coroutine function, an
async generator function where the sync one is a generator, or returns an async
iterator / awaitable async context manager where the sync one returns an iterator /
context manager.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from bastion import AsyncBastion, AsyncJobEventStream, AsyncTerminal, Bastion, JobEventStream
from bastion import Terminal as SyncTerminal

#: Async names read as their sync twins when annotations are compared.
ASYNC_NAMES = {
    "AsyncBastion": "Bastion",
    "AsyncSessions": "Sessions",
    "AsyncJobs": "Jobs",
    "AsyncFiles": "Files",
    "AsyncTerminals": "Terminals",
    "AsyncTerminal": "Terminal",
    "_Connecting": "Terminal",  # awaits to an AsyncTerminal
    "AsyncJobEventStream": "JobEventStream",
    "AsyncIterator": "Iterator",
    "AsyncGenerator": "Generator",
    "AsyncUploadData": "UploadData",
    "AsyncDownloadDestination": "DownloadDestination",
    "AsyncMessageCallback": "MessageCallback",
    "httpx.AsyncBaseTransport": "httpx.BaseTransport",
}
#: Protocol methods that change name with asyncio.
ASYNC_DUNDERS = {
    "__enter__": "__aenter__",
    "__exit__": "__aexit__",
    "__iter__": "__aiter__",
    "__next__": "__anext__",
}
#: Members only the async side has, and why.
ASYNC_ONLY = {
    (AsyncJobEventStream, "aclose"),  # for contextlib.aclosing
    (AsyncTerminal, "__aiter__"),  # messages without on_message: `async for`
    (AsyncTerminal, "__anext__"),
}


def _pairs() -> list[tuple[type, type]]:
    sync, asyn = Bastion("http://bastion.test"), AsyncBastion("http://bastion.test")
    try:
        pairs: list[tuple[type, type]] = [(Bastion, AsyncBastion)]
        for name in ("sessions", "jobs", "files", "terminal"):
            pairs.append((type(getattr(sync, name)), type(getattr(asyn, name))))
    finally:
        sync.close()
    pairs += [(SyncTerminal, AsyncTerminal), (JobEventStream, AsyncJobEventStream)]
    return pairs


PAIRS = _pairs()


def _public(cls: type) -> set[str]:
    names = {n for n in dir(cls) if not n.startswith("_")}
    return names | {n for n in (*ASYNC_DUNDERS, *ASYNC_DUNDERS.values()) if n in vars(cls)}


def _as_sync(annotation: str) -> str:
    for async_name, sync_name in ASYNC_NAMES.items():
        annotation = re.sub(rf"(?<![\w.]){re.escape(async_name)}\b", sync_name, annotation)
    return annotation


def _twin(name: str) -> str:
    return ASYNC_DUNDERS.get(name, name)


def _ids(pairs: list[tuple[type, type]]) -> list[str]:
    return [f"{s.__name__}-{a.__name__}" for s, a in pairs]


@pytest.mark.parametrize(("sync_cls", "async_cls"), PAIRS, ids=_ids(PAIRS))
def test_same_public_members(sync_cls: type, async_cls: type) -> None:
    expected = {_twin(name) for name in _public(sync_cls)}
    extra = {name for cls, name in ASYNC_ONLY if cls is async_cls}
    assert _public(async_cls) == expected | extra


def _members(pairs: list[tuple[type, type]]) -> list[tuple[type, type, str]]:
    members = [(s, a, name) for s, a in pairs for name in sorted(_public(s))]
    return [(Bastion, AsyncBastion, "__init__"), *members]  # the constructors too


MEMBERS = _members(PAIRS)


@pytest.mark.parametrize(
    ("sync_cls", "async_cls", "name"),
    MEMBERS,
    ids=[f"{s.__name__}.{n}" for s, _, n in MEMBERS],
)
def test_member_signatures_match(sync_cls: type, async_cls: type, name: str) -> None:
    sync_member = inspect.getattr_static(sync_cls, name)
    async_member = inspect.getattr_static(async_cls, _twin(name))
    if isinstance(sync_member, property):
        assert isinstance(async_member, property), name
        sync_type = inspect.signature(sync_member.fget).return_annotation  # type: ignore[arg-type]
        async_type = inspect.signature(async_member.fget).return_annotation  # type: ignore[arg-type]
        assert _as_sync(str(async_type)) == str(sync_type)
        return
    sync_fn, async_fn = getattr(sync_cls, name), getattr(async_cls, _twin(name))
    sync_sig, async_sig = inspect.signature(sync_fn), inspect.signature(async_fn)
    # Same parameters: names, order, kinds, defaults, types.
    assert list(sync_sig.parameters) == list(async_sig.parameters)
    for param, twin in zip(
        sync_sig.parameters.values(), async_sig.parameters.values(), strict=True
    ):
        assert param.kind == twin.kind, (name, param.name)
        assert param.default == twin.default, (name, param.name)
        assert _as_sync(str(twin.annotation)) == str(param.annotation), (name, param.name)
    # Same results, delivered the async way.
    assert _as_sync(str(async_sig.return_annotation)) == str(sync_sig.return_annotation), name
    if name.startswith("__") and name not in ("__enter__", "__exit__", "__next__"):
        return  # __init__, __iter__/__aiter__: plain functions on both sides
    _assert_async(async_cls, _twin(name), async_fn, sync_fn)


def _assert_async(cls: type, name: str, async_fn: Any, sync_fn: Any) -> None:
    if inspect.isgeneratorfunction(sync_fn):
        assert inspect.isasyncgenfunction(async_fn), f"{cls.__name__}.{name}"
        return
    if inspect.iscoroutinefunction(async_fn):
        return
    # Not a coroutine: it must return an async iterator or an awaitable that is
    # also an async context manager (no I/O happens until it is used).
    returns = typing.get_type_hints(async_fn)["return"]
    origin = typing.get_origin(returns) or returns
    assert isinstance(origin, type), f"{cls.__name__}.{name} returns {returns!r}"
    is_async_iterator = issubclass(origin, AsyncIterator)
    is_awaitable_cm = issubclass(origin, Awaitable) and hasattr(origin, "__aenter__")
    assert is_async_iterator or is_awaitable_cm, f"{cls.__name__}.{name} is not async"
    assert hasattr(origin, "__aenter__") and hasattr(origin, "__aexit__"), name


def test_every_async_method_is_async() -> None:
    """No public method of the async side does blocking I/O under a sync name."""
    for _, async_cls in PAIRS:
        for name in _public(async_cls):
            member = inspect.getattr_static(async_cls, name)
            if isinstance(member, property) or name in ("__aiter__", "__init__"):
                continue
            fn = getattr(async_cls, name)
            if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
                continue
            _assert_async(async_cls, name, fn, fn)


def test_the_comparison_would_notice_a_drift() -> None:
    class SyncThing:
        def get(self, session_id: str, *, timeout: float | None = None) -> dict[str, Any]:
            return {}

    class AsyncThing:
        async def get(self, session_id: str, *, timeout: float | None = 5.0) -> dict[str, Any]:
            return {}

    a, b = inspect.signature(SyncThing.get), inspect.signature(AsyncThing.get)
    assert a.parameters["timeout"].default != b.parameters["timeout"].default
    assert _as_sync("AsyncIterator[bytes]") == "Iterator[bytes]"
    assert _as_sync("httpx.AsyncBaseTransport | None") == "httpx.BaseTransport | None"
    assert _as_sync("MyAsyncBastion") == "MyAsyncBastion"  # whole names only


def test_async_docstrings_come_from_the_sync_twins() -> None:
    for sync_cls, async_cls in PAIRS:
        for name in _public(sync_cls):
            if name.startswith("__"):
                continue
            if not inspect.getattr_static(sync_cls, name).__doc__:
                continue
            member = inspect.getattr_static(async_cls, _twin(name))
            assert member.__doc__, f"{async_cls.__name__}.{name} has no docstring"
    sessions, async_sessions = PAIRS[1]
    assert async_sessions.get.__doc__ == sessions.get.__doc__
