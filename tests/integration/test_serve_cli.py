"""`bastion serve` refuses unsafe or impossible settings with a plain message."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration]


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_refuses_a_public_address_without_a_key() -> None:
    r = _serve("--host", "0.0.0.0", "--port", "1")
    assert r.returncode == 2 and "without an API key" in r.stderr


def test_missing_image_is_explained(tmp_path: object) -> None:
    r = _serve("--images-dir", "/nonexistent/images", "--port", "18999")
    assert r.returncode == 2 and "bastion image build" in r.stderr


def test_help_lists_every_setting() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bastion", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    for flag in ("--host", "--port", "--data-dir", "--api-key", "--runtime", "BASTION_API_KEYS"):
        assert flag in r.stdout
