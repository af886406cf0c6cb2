"""``bastion.images``: build images from recipes, list, show and delete them (sync and
async).

A recipe is what a TOML recipe file holds, as a mapping::

    bastion.images.build({
        "name": "judge",
        "from": "default",
        "apt": ["g++"],
        "pip": ["numpy==2.*"],
        "files": {"/etc/judge.conf": b"strict = true\\n"},
    }, on_log=print)

or the name of a stock recipe shipped with the server (``"python"``, ``"build"``).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import httpx

from .._base import BaseBastion, docs_from
from .._exceptions import ImageBuildError
from ..wire import BuildImageRequest, ImageInfo, ImageList

if TYPE_CHECKING:
    from .._client import AsyncBastion, Bastion

from .._base import APIRequest
from .._local_files import (
    AsyncUploadData,
    UploadBody,
    UploadData,
    async_upload_body,
    upload_body,
)

#: Called with each piece of a build's log, as it is written.
LogCallback = Callable[[str], None]
#: A build's log stream may stay quiet for long (a big download): no read timeout.
_LOG_TIMEOUT = httpx.Timeout(30.0, read=None)
#: An import answers once the archive is received and read through: a large one takes
#: a while after its last byte.
_LONG = httpx.Timeout(30.0, read=600.0)


def _url(*parts: str) -> str:
    return BaseBastion._url("images", *(quote(p, safe="") for p in parts))


def build_body(recipe: Mapping[str, Any] | str, no_cache: bool) -> BuildImageRequest:
    """The request body: a recipe's ``files`` bytes (or text) go as base64."""
    if isinstance(recipe, str):
        body: BuildImageRequest = {"recipe": recipe}
    else:
        data = dict(recipe)
        files = data.get("files")
        if isinstance(files, Mapping):
            data["files"] = {
                path: base64.b64encode(
                    content.encode() if isinstance(content, str) else bytes(content)
                ).decode("ascii")
                for path, content in files.items()
            }
        body = {"recipe": data}
    if no_cache:
        body["no_cache"] = True
    return body


def build_request(body: BuildImageRequest) -> APIRequest:
    """``POST /v1/images``: a repeat builds again (a cache hit, at worst): idempotent."""
    return APIRequest("POST", _url(), json=body)


def get_request(name: str) -> APIRequest:
    return APIRequest("GET", _url(name))


def list_request(cursor: str | None) -> APIRequest:
    return APIRequest("GET", _url(), params={"cursor": cursor} if cursor else None)


def delete_request(name: str) -> APIRequest:
    return APIRequest("DELETE", _url(name))


def log_request(name: str, follow: bool) -> APIRequest:
    params = {"follow": "true"} if follow else None
    return APIRequest("GET", _url(name, "log"), params=params, timeout=_LOG_TIMEOUT)


def import_request(name: str, body: UploadBody) -> APIRequest:
    """``POST /v1/images/import``: the same archive again is the same image."""
    return APIRequest("POST", _url("import"), params={"name": name}, body=body, timeout=_LONG)


def pull_request(name: str, ref: str) -> APIRequest:
    return APIRequest("POST", _url("pull"), json={"name": name, "ref": ref})


def finished(info: ImageInfo) -> ImageInfo:
    """``info``, or :class:`ImageBuildError` for a failed build, import or pull."""
    if info["status"] == "failed":
        raise ImageBuildError(info)
    return info


class Images:
    """Images sessions run (``bastion.images``): build them from recipes, list, show
    and delete them.  Pass one to ``sessions.create(image=...)``.

    An image a key builds is that key's alone; stock images (the server's ``default``,
    the shipped ``python`` and ``build`` recipes) and those an admin key builds are
    shared with every key.
    """

    def __init__(self, client: Bastion) -> None:
        self._client = client

    def build(
        self,
        recipe: Mapping[str, Any] | str,
        *,
        on_log: LogCallback | None = None,
        wait: bool = True,
        no_cache: bool = False,
    ) -> ImageInfo:
        """Build an image from a recipe, in a sandbox on the server.

        The same recipe over the same base is built once: a rebuild is a cache hit,
        ready at once.

        Args:
            recipe: A recipe mapping (``name``, ``from``, ``apt``, ``pip``, ``npm``,
                ``run``, ``env``, ``workdir``, ``files`` of path -> bytes), or a stock
                recipe's name (``"python"``, ``"build"``).
            on_log: Called with each piece of the build's log as it is written.
            wait: Wait for the build to end (default); False returns at once with the
                image ``building``.
            no_cache: Build again even if the same build is stored.

        Returns:
            The image's ``ImageInfo`` (``status`` ``"ready"`` once waited for).

        Raises:
            InvalidRecipeError: The recipe cannot be built as written (the message
                names the key); nothing was built.
            ImageBuildError: A step failed; ``.image`` has the reason, the log has the
                step's output.  Nothing of the build was kept.
            ImageNotFoundError: Its ``from`` image does not exist.
        """
        request = build_request(build_body(recipe, no_cache))
        return self._wait(cast(ImageInfo, self._client._request(request)), on_log, wait)

    def import_archive(
        self,
        name: str,
        archive: UploadData,
        *,
        on_log: LogCallback | None = None,
        wait: bool = True,
    ) -> ImageInfo:
        """Import an OCI image: a ``docker save`` / ``podman save`` archive or an OCI
        layout tarball (bytes, or a binary file object, streamed).

        Its layers become one image of this key (shared, for an admin key); its
        config's ``Env`` and ``WorkingDir`` apply to its sessions, whose jobs run as
        the sandbox user (uid 1000; ``user="root"`` for root).  The server unpacks it
        after the upload, as it builds a recipe: this waits for it (``on_log`` gets
        its progress) unless ``wait`` is False.

        Returns:
            The image's ``ImageInfo`` (``status`` ``"ready"`` once waited for).

        Raises:
            InvalidRequestError: Not an image archive.
            ImageBuildError: One that may not be unpacked (a member leaving the tree,
                owners beyond 65535); ``.image`` has the reason.
        """
        request = import_request(name, upload_body(archive))
        return self._wait(cast(ImageInfo, self._client._request(request)), on_log, wait)

    def pull(
        self,
        name: str,
        ref: str,
        *,
        on_log: LogCallback | None = None,
        wait: bool = True,
    ) -> ImageInfo:
        """Pull ``ref`` (``registry[:port]/repository[:tag]``) from a registry and
        import it as ``name``: the server fetches and unpacks it, and this waits for
        it (``on_log`` gets its progress) unless ``wait`` is False.

        Returns:
            The image's ``ImageInfo`` (``status`` ``"ready"`` once waited for).

        Raises:
            InvalidRequestError: A malformed reference, or a registry the server does
                not pull from.
            ImageBuildError: The registry has no such image or cannot be reached
                (``.image`` has the reason).
        """
        request = pull_request(name, ref)
        return self._wait(cast(ImageInfo, self._client._request(request)), on_log, wait)

    def _wait(self, info: ImageInfo, on_log: LogCallback | None, wait: bool) -> ImageInfo:
        """Follow a build, import or pull that ``info`` started to its end (its log to
        ``on_log``); returns its final info, or raises if it failed."""
        if not wait and on_log is None:
            return info
        if info["status"] == "building" or on_log is not None:
            with self._client._stream(log_request(info["name"], follow=True)) as response:
                for chunk in response.iter_text():
                    if on_log is not None and chunk:
                        on_log(chunk)
        info = self.get(info["name"])
        return finished(info) if wait else info

    def get(self, name: str) -> ImageInfo:
        """One image: its ``status`` (``building``, ``ready``, ``failed``), ``digest``,
        ``parent`` and ``size_bytes`` (only its own layer).

        Raises:
            ImageNotFoundError: The key has no image of this name, nor is one shared.
        """
        return cast(ImageInfo, self._client._request(get_request(name)))

    def list(self) -> list[ImageInfo]:
        """Every image the key may use (its own and the shared ones), by name."""
        images: list[ImageInfo] = []
        cursor: str | None = None
        while True:
            page = cast(ImageList, self._client._request(list_request(cursor)))
            images.extend(page["images"])
            cursor = page["next_cursor"]
            if cursor is None:
                return images

    def log(self, name: str) -> str:
        """The image's build log so far."""
        with self._client._stream(log_request(name, follow=False)) as response:
            return "".join(response.iter_text())

    def delete(self, name: str) -> ImageInfo:
        """Delete an image; returns its info as it was.

        Raises:
            ImageStateError: Sessions still run it, images are built over it, or it
                is being built.
            InsufficientScopeError: It is shared and the key is not an admin key.
        """
        return cast(ImageInfo, self._client._request(delete_request(name)))


@docs_from(Images)
class AsyncImages:
    """The async twin of :class:`Images`: the same methods, as coroutines."""

    def __init__(self, client: AsyncBastion) -> None:
        self._client = client

    async def build(
        self,
        recipe: Mapping[str, Any] | str,
        *,
        on_log: LogCallback | None = None,
        wait: bool = True,
        no_cache: bool = False,
    ) -> ImageInfo:
        request = build_request(build_body(recipe, no_cache))
        return await self._wait(cast(ImageInfo, await self._client._request(request)), on_log, wait)

    async def import_archive(
        self,
        name: str,
        archive: AsyncUploadData,
        *,
        on_log: LogCallback | None = None,
        wait: bool = True,
    ) -> ImageInfo:
        request = import_request(name, async_upload_body(archive))
        return await self._wait(cast(ImageInfo, await self._client._request(request)), on_log, wait)

    async def pull(
        self,
        name: str,
        ref: str,
        *,
        on_log: LogCallback | None = None,
        wait: bool = True,
    ) -> ImageInfo:
        request = pull_request(name, ref)
        return await self._wait(cast(ImageInfo, await self._client._request(request)), on_log, wait)

    async def _wait(self, info: ImageInfo, on_log: LogCallback | None, wait: bool) -> ImageInfo:
        if not wait and on_log is None:
            return info
        if info["status"] == "building" or on_log is not None:
            async with self._client._stream(log_request(info["name"], follow=True)) as response:
                async for chunk in response.aiter_text():
                    if on_log is not None and chunk:
                        on_log(chunk)
        info = await self.get(info["name"])
        return finished(info) if wait else info

    async def get(self, name: str) -> ImageInfo:
        return cast(ImageInfo, await self._client._request(get_request(name)))

    async def list(self) -> list[ImageInfo]:
        images: list[ImageInfo] = []
        cursor: str | None = None
        while True:
            page = cast(ImageList, await self._client._request(list_request(cursor)))
            images.extend(page["images"])
            cursor = page["next_cursor"]
            if cursor is None:
                return images

    async def log(self, name: str) -> str:
        async with self._client._stream(log_request(name, follow=False)) as response:
            return "".join([chunk async for chunk in response.aiter_text()])

    async def delete(self, name: str) -> ImageInfo:
        return cast(ImageInfo, await self._client._request(delete_request(name)))
