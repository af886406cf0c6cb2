"""Backends chosen by configuration (runtime/factory.py, ``--backend``), and the OCI
runtime binary's extra flags (``--runtime-arg``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bastion_server.config import ConfigError, ServerConfig
from bastion_server.runtime.factory import BACKENDS, make_backend
from bastion_server.runtime.fake import FakeRuntime
from bastion_server.runtime.oci import OciRuntime
from bastion_server.runtime.warm_pool import WarmPool
from bastion_server.serve_options import add_serve_options, config_from_args
from bastion_server.testing import IMAGES_DIR


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_options(parser)
    return parser.parse_args(list(argv))


def test_the_oci_backend_is_the_default_wrapped_in_its_warm_pool(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path, images_dir=IMAGES_DIR, pool_size=3)
    runtime = make_backend(config)
    assert isinstance(runtime, WarmPool)
    assert isinstance(runtime.inner, OciRuntime)
    assert runtime._sizes == {next(iter(runtime._sizes)): 3}


def test_the_fake_backend_is_chosen_by_name(tmp_path: Path) -> None:
    runtime = make_backend(ServerConfig(data_dir=tmp_path, backend="fake"))
    assert isinstance(runtime, FakeRuntime)
    assert runtime.root == tmp_path / "fake"


def test_an_unknown_backend_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend 'vm': one of oci, fake"):
        make_backend(ServerConfig(data_dir=tmp_path, backend="vm"))


def test_serve_chooses_a_backend_of_the_factory_and_refuses_others() -> None:
    assert config_from_args(_args(), environ={}).backend == "oci"
    assert config_from_args(_args("--backend", "fake"), environ={}).backend == "fake"
    assert set(BACKENDS) == {"oci", "fake"}
    with pytest.raises(ConfigError, match="must be one of oci, fake"):
        config_from_args(_args(), environ={"BASTION_BACKEND": "vm"})


def test_runtime_args_go_before_every_command_of_the_binary(tmp_path: Path) -> None:
    config = config_from_args(
        _args("--data-dir", str(tmp_path), "--images-dir", str(IMAGES_DIR),
              "--runtime", "runc", "--runtime-arg=--systemd-cgroup", "--runtime-arg=--debug"),
        environ={},
    )  # fmt: skip
    assert config.runtime_args == ("--systemd-cgroup", "--debug")
    runtime = make_backend(config)
    assert isinstance(runtime, WarmPool) and isinstance(runtime.inner, OciRuntime)
    argv = runtime.inner.binary.argv("state", "s1")
    assert argv == ["runc", "--systemd-cgroup", "--debug", "--root",
                    OciRuntime.state_root_for(tmp_path), "state", "s1"]  # fmt: skip
