"""The public surface of the ``bastion`` package."""

from __future__ import annotations

import inspect
import tomllib
from collections.abc import Awaitable
from pathlib import Path

import bastion
from bastion import wire

EXCEPTIONS = {
    "BastionError",
    "APIConnectionError",
    "APITimeoutError",
    "AuthenticationError",
    "InvalidRequestError",
    "ImageError",
    "ImageNotFoundError",
    "ImageStateError",
    "ImageBuildError",
    "InvalidRecipeError",
    "NotFoundError",
    "ServerError",
    "SessionError",
    "SessionNotFoundError",
    "SessionStateError",
    "SessionStartError",
    "JobError",
    "JobNotFoundError",
    "InvalidCommandError",
    "JobFailedError",
    "JobTimeoutError",
    "FileError",
    "FileUploadError",
    "FileListError",
    "FileDeleteError",
    "FileDownloadError",
    "PathNotFoundError",
    "FileListNotFoundError",
    "FileDeleteNotFoundError",
    "FileDownloadNotFoundError",
    "FileUploadNotFoundError",
    "TerminalError",
    "TerminalConnectionError",
    "TerminalSendError",
    "TerminalAuthenticationError",
    "TerminalSessionNotFoundError",
    "TerminalSessionStateError",
    "TerminalTimeoutError",
    "LocalFileError",
    "InsufficientScopeError",
    "QuotaExceededError",
    "TerminalForbiddenError",
    "ServerShutdownError",
    "JobStateError",
    "SnapshotError",
    "SnapshotNotFoundError",
    "SnapshotStateError",
}
#: Classes of the SDK that are not exceptions or wire types.
CLASSES = {
    "Bastion",
    "Terminal",
    "JobEventStream",
    "AsyncBastion",
    "AsyncTerminal",
    "AsyncJobEventStream",
}
# typing.is_typeddict misses typing_extensions.TypedDict classes; their marks do not.
WIRE_TYPES = {
    name
    for name, value in vars(wire).items()
    if isinstance(value, type) and hasattr(value, "__required_keys__") and not name.startswith("_")
}
ENUMS = {"ErrorCode", "JobStatus", "KeyScope", "SessionStatus", "SnapshotStatus"}


def test_public_surface() -> None:
    assert set(bastion.__all__) == {"__version__"} | CLASSES | EXCEPTIONS | WIRE_TYPES | ENUMS
    assert len(bastion.__all__) == len(set(bastion.__all__))
    for name in bastion.__all__:
        assert hasattr(bastion, name), name


def test_every_wire_typeddict_is_exported_as_is() -> None:
    assert {"SessionInfo", "JobInfo", "JobResult", "FileList", "HealthInfo"} <= WIRE_TYPES
    for name in WIRE_TYPES:
        assert getattr(bastion, name) is getattr(wire, name)


def test_version_matches_pyproject() -> None:
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert bastion.__version__ == version


def test_public_methods_are_documented() -> None:
    client = bastion.Bastion("http://bastion.test")
    try:
        for resource in (client.sessions, client.jobs, client.files, client.terminal):
            for name, method in inspect.getmembers(resource, inspect.ismethod):
                if name.startswith("_"):
                    continue
                doc = inspect.getdoc(method) or ""
                assert doc, f"{type(resource).__name__}.{name} has no docstring"
                if name != "status":  # an alias, documented as one
                    assert "Returns:" in doc or "Yields:" in doc, name
    finally:
        client.close()


def test_product_page_signatures() -> None:
    sig = inspect.signature(bastion.Bastion)
    assert list(sig.parameters)[:3] == ["base_url", "api_key", "timeout"]
    assert sig.parameters["timeout"].default == 30.0
    assert sig.parameters["transport"].kind is inspect.Parameter.KEYWORD_ONLY
    client = bastion.Bastion("http://bastion.test")
    try:
        params = inspect.signature(client.jobs.run_and_wait).parameters
        page = [
            "session_id",
            "command",
            "env",
            "cwd",
            "timeout",
            "wait_timeout",
            "on_stdout",
            "on_stderr",
        ]
        assert list(params)[: len(page)] == page
        # What came after the product page is keyword-only: no call written for it moves.
        later = list(params.values())[len(page) :]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in later), later
        assert list(inspect.signature(client.jobs.watch).parameters) == [
            "session_id",
            "job_id",
            "on_update",
            "timeout",
            "on_output",
        ]
        connect = inspect.signature(client.terminal.connect).parameters
        assert list(connect)[:2] == ["session_id", "on_message"]
        assert inspect.signature(client.files.list).parameters["path"].default == "/"
    finally:
        client.close()


def test_async_public_methods_are_documented() -> None:
    client = bastion.AsyncBastion("http://bastion.test")
    for resource in (client.sessions, client.jobs, client.files, client.terminal):
        for name, method in inspect.getmembers(resource, inspect.ismethod):
            if name.startswith("_"):
                continue
            doc = inspect.getdoc(method) or ""
            assert doc, f"{type(resource).__name__}.{name} has no docstring"
            if name != "status":
                assert "Returns:" in doc or "Yields:" in doc, name
    for cls in (bastion.AsyncBastion, bastion.AsyncTerminal, bastion.AsyncJobEventStream):
        assert inspect.getdoc(cls), cls


def test_async_product_page_signatures() -> None:
    for cls in (bastion.Bastion, bastion.AsyncBastion):
        params = inspect.signature(cls).parameters
        assert list(params)[:3] == ["base_url", "api_key", "timeout"]
        assert params["timeout"].default == 30.0
        assert params["max_retries"].default == 2
        for name in ("connect_timeout", "max_retries", "limits", "transport"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    client = bastion.AsyncBastion("http://bastion.test")
    assert inspect.iscoroutinefunction(client.jobs.run_and_wait)
    assert inspect.isasyncgenfunction(client.files.iter_download)
    assert hasattr(client.jobs.stream("s1", "j1"), "__aiter__")
    assert isinstance(client.terminal.connect("s1"), Awaitable)


def test_exceptions_module_is_public() -> None:
    """``from bastion.exceptions import SessionError``, as the product page writes it."""
    import bastion.exceptions

    assert set(bastion.exceptions.__all__) == EXCEPTIONS
    for name in bastion.exceptions.__all__:
        assert getattr(bastion.exceptions, name) is getattr(bastion, name), name
    assert "SessionError" in (bastion.exceptions.__doc__ or "")
