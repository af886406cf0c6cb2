"""Debian suites as recipe bases: what a suite's base is, and which suites a server
bootstraps (the host's debootstrap knows it, the mirror has it)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion_server.image import debian_base
from bastion_server.image.builder import DEFAULT_RECIPE


class _Mirror(http.server.BaseHTTPRequestHandler):
    """A Debian mirror holding only bookworm's Release file."""

    def do_HEAD(self) -> None:
        self.send_response(200 if self.path == "/debian/dists/bookworm/Release" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mirror() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/debian"
    server.shutdown()
    server.server_close()


def test_a_suite_base_is_default_s_user_and_shift_over_minbase() -> None:
    recipe = debian_base.base_recipe("trixie")
    assert (recipe.name, recipe.suite, recipe.variant) == ("debian.trixie", "trixie", "minbase")
    assert recipe.packages == ()
    assert (recipe.uid, recipe.user, recipe.uid_shift) == (
        DEFAULT_RECIPE.uid,
        DEFAULT_RECIPE.user,
        DEFAULT_RECIPE.uid_shift,
    )
    # Its digest is known before it is built: a recipe over it can hit the cache.
    assert recipe.digest() == debian_base.base_recipe("trixie").digest()
    assert recipe.digest() != debian_base.base_recipe("bookworm").digest()


@pytest.mark.skipif(
    not (debian_base.DEBOOTSTRAP_SCRIPTS / "bookworm").exists(), reason="needs debootstrap"
)
def test_a_suite_the_mirror_lacks_is_refused(mirror: str) -> None:
    debian_base.check_suite("bookworm", mirror)
    with pytest.raises(debian_base.SuiteError, match="not on this server's Debian mirror"):
        debian_base.check_suite("sid", mirror)


def test_a_suite_debootstrap_does_not_know_is_refused(
    mirror: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(debian_base, "DEBOOTSTRAP_SCRIPTS", tmp_path)
    with pytest.raises(debian_base.SuiteError, match="debootstrap knows"):
        debian_base.check_suite("bookworm", mirror)


def test_an_unreachable_mirror_is_left_to_the_bootstrap_to_report() -> None:
    if not (debian_base.DEBOOTSTRAP_SCRIPTS / "bookworm").exists():
        pytest.skip("needs debootstrap")
    debian_base.check_suite("bookworm", "http://127.0.0.1:9/debian", timeout=2)


def test_no_base_is_stored_until_bootstrapped(tmp_path: Path) -> None:
    assert debian_base.stored_base(tmp_path, "bookworm") is None
    (tmp_path / debian_base.base_recipe("bookworm").dir_name()).mkdir()  # not whole
    assert debian_base.stored_base(tmp_path, "bookworm") is None
