"""``bastion serve``'s settings (command line > environment > config file > default),
the env file's format, key scopes and the example config file; no server."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from bastion.wire import KeyScope
from bastion_server.api.auth import authorize
from bastion_server.config import ConfigError, ServerConfig, read_config_file
from bastion_server.serve_options import BY_NAME, OPTIONS, add_serve_options, config_from_args
from bastion_server.service.environment import load_env_file, merged_env
from bastion_server.service.errors import ServiceError
from bastion_server.service.keys import KeyService, Principal, fingerprint
from bastion_server.store.sqlite import Store

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "bastion.example.toml"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_options(parser)
    return parser.parse_args(argv)


def test_defaults_without_anything() -> None:
    config = config_from_args(parse(), environ={})
    assert config == ServerConfig(
        data_dir=config.data_dir, images_dir=config.images_dir, max_limits=config.max_limits
    )


def test_command_line_over_environment_over_file_over_default(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text(
        'port = 1111\nmax-upload-bytes = 10\nruntime = "runc"\naudit_log = "a.jsonl"\n'
        'api_keys = ["from-the-file-key"]\n'
    )
    env = {"BASTION_PORT": "2222", "BASTION_MAX_UPLOAD_BYTES": "20"}
    config = config_from_args(parse("--config", str(path), "--port", "3333"), environ=env)
    assert config.port == 3333  # command line
    assert config.max_upload_bytes == 20  # environment
    assert config.runtime == "runc"  # file
    assert config.audit_log == tmp_path / "a.jsonl"  # relative to the file
    assert config.api_keys == ("from-the-file-key",)
    assert config.pool_size == 2  # default
    env = {"BASTION_API_KEYS": "one-key-123, two-key-456", "BASTION_CONFIG": str(path)}
    config = config_from_args(parse(), environ=env)
    assert config.api_keys == ("one-key-123", "two-key-456") and config.port == 1111


def test_a_config_file_names_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text("max_upload_byte = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_upload_byte'"):
        config_from_args(parse("--config", str(path)), environ={})
    path.write_text("no_network = 1\n")
    with pytest.raises(ConfigError, match="no_network must be bool"):
        config_from_args(parse("--config", str(path)), environ={})
    path.write_text("port = 1\nport = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_from_args(parse("--config", str(path)), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        config_from_args(parse("--config", str(tmp_path / "missing.toml")), environ={})
    with pytest.raises(ConfigError, match="BASTION_PORT"):
        config_from_args(parse(), environ={"BASTION_PORT": "eighty"})


def test_every_option_has_its_flag_env_and_key() -> None:
    for option in OPTIONS:
        assert option.env == "BASTION_" + option.name.upper()
    assert BY_NAME["api_keys"].option_string == "--api-key"
    assert BY_NAME["max_jobs_per_key"].option_string == "--max-jobs-per-key"


def test_the_example_config_file_is_valid_and_shows_every_setting() -> None:
    settings = read_config_file(EXAMPLE, BY_NAME)
    assert settings  # some are set, not only shown
    text = EXAMPLE.read_text()
    for option in OPTIONS:
        assert re.search(rf"^#? ?{option.name} = ", text, re.M), option.name


def test_the_env_file_format(tmp_path: Path) -> None:
    path = tmp_path / "s.env"
    path.write_text(
        "# a comment\n\nPLAIN=a b\nexport EXPORTED=1\nQUOTED=\"x y\"\nSINGLE='$NOT'\nEMPTY=\n"
    )
    assert load_env_file(path) == {
        "PLAIN": "a b",
        "EXPORTED": "1",
        "QUOTED": "x y",
        "SINGLE": "$NOT",
        "EMPTY": "",
    }
    path.write_text("GOOD=1\n1BAD=2\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_env_file(path)
    assert merged_env({"A": "1", "B": "1"}, {"B": "2"}, {"C": "3"}) == {
        "A": "1",
        "B": "2",
        "C": "3",
    }


def test_scopes() -> None:
    admin = Principal("k", "k", KeyScope.ADMIN)
    agent = Principal("k", "k", KeyScope.AGENT)
    viewer = Principal("k", "k", KeyScope.VIEWER)
    for who in (admin, agent, viewer):
        authorize(who, "GET", "/v1/sessions")
    authorize(admin, "POST", "/v1/keys")
    authorize(agent, "POST", "/v1/sessions/s/jobs")
    for who, method, path in (
        (agent, "GET", "/v1/keys"),
        (viewer, "GET", "/v1/keys"),
        (viewer, "POST", "/v1/sessions"),
        (viewer, "DELETE", "/v1/sessions/s"),
        (viewer, "PUT", "/v1/sessions/s/files"),
        (viewer, "POST", "/session/create"),  # the original server's routes too
    ):
        with pytest.raises(ServiceError) as err:
            authorize(who, method, path)
        assert err.value.code == "insufficient_scope"


def test_keys_are_kept_as_hashes_and_revoked_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "b.db")
    keys = KeyService(store, ("configured-admin-key",))
    record, secret = keys.create("viewer", name="dash", tenant=fingerprint("configured-admin-key"))
    assert keys.identify(secret) == Principal(
        record.id, fingerprint("configured-admin-key"), KeyScope.VIEWER
    )
    assert secret not in str(store.list_keys())
    # A second service over the same store (a restart) knows it too.
    assert KeyService(store, ("configured-admin-key",)).identify(secret).key_id == record.id
    keys.revoke("dash")
    with pytest.raises(ServiceError, match="invalid API key"):
        keys.identify(secret)
    with pytest.raises(ServiceError, match="required"):
        keys.identify(None)
    with pytest.raises(ServiceError, match="tenant"):
        keys.create("agent", tenant="key_000000000000000000000000")
    # Without configured keys: anonymous admin, but a made key still acts as itself.
    open_keys = KeyService(store, ())
    _, other = open_keys.create("agent")
    assert open_keys.identify(None).key_id == "anonymous"
    assert open_keys.identify(other).scope == KeyScope.AGENT
