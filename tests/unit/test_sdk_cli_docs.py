"""The docs match the code: docs/API.md is what scripts/gen-api-docs.py makes of the
docstrings, docs/CLI.md's exit codes are the CLI's, and every example in a command's
``--help`` is a command line that parses."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import bastion
from bastion.cli import EXEC_FAILED, ExitCode, build_parser

ROOT = Path(__file__).resolve().parents[2]
API_MD = ROOT / "docs" / "API.md"
CLI_MD = ROOT / "docs" / "CLI.md"
README = ROOT / "README.md"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts/gen-api-docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- API.md


def test_api_reference_is_up_to_date() -> None:
    expected = load_generator().generate(bastion)
    assert API_MD.read_text() == expected, (
        "docs/API.md is out of date: run `python scripts/gen-api-docs.py`"
    )


def test_api_reference_covers_every_export() -> None:
    text = API_MD.read_text()
    for name in bastion.__all__:
        if name != "__version__":
            assert f"`{name}`" in text or f"## {name}" in text, name
    for method in ("sessions.create", "jobs.run_and_wait", "files.download_to", "terminal"):
        assert method.split(".")[-1] in text


def test_api_reference_code_blocks_are_python() -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", API_MD.read_text(), re.S | re.M)
    assert blocks
    for block in blocks:
        compile(block, "<API.md>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_generator_turns_google_docstrings_into_markdown() -> None:
    gen = load_generator()
    doc = """Do a thing with ``x``, see :meth:`Other.thing`.

    Like so::

        thing(1)

    Args:
        x: The first
            argument, on two lines.
        y: The second.

    Returns:
        ``{"a": 1}``.

    Raises:
        ValueError: Bad ``x``.
    """
    assert gen.markdown(doc) == (
        "Do a thing with `x`, see `Other.thing`.\n\n"
        "Like so:\n\n```python\nthing(1)\n```\n\n"
        "**Args:**\n\n"
        "- `x`: The first argument, on two lines.\n"
        "- `y`: The second.\n\n"
        '**Returns:**\n\n`{"a": 1}`.\n\n'
        "**Raises:**\n\n"
        "- `ValueError`: Bad `x`."
    )


# --------------------------------------------------------------------------- CLI.md


def test_cli_exit_code_table_matches_the_code() -> None:
    text = CLI_MD.read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", section, re.M)
    assert [int(code) for code, _ in rows] == [int(code) for code in ExitCode]


def test_cli_exit_code_table_has_exec_and_shell() -> None:
    text = CLI_MD.read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `exec`/`shell` \| (.+) \|$", section, re.M)
    assert len(rows) == 1
    assert "remote command's status" in rows[0] and f"{EXEC_FAILED} when" in rows[0]


def test_readme_summarises_every_exit_code() -> None:
    text = README.read_text()
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    for code in ExitCode:
        if code != ExitCode.INTERRUPTED:
            assert re.search(rf"\b{int(code)} [a-z]", section), code
    assert f"or {EXEC_FAILED} when" in section  # exec and shell
    assert "docs/CLI.md" in section


# --------------------------------------------------------------------------- --help


def all_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*path, name))


PARSER, _ = build_parser([])
PARSERS = list(all_parsers(PARSER))


def test_every_command_is_reached() -> None:
    names = {" ".join(path) for path, _ in PARSERS}
    for group, actions in {
        "sessions": ["create", "list", "status", "start", "stop", "delete"],
        "files": ["upload", "download", "list", "delete"],
        "jobs": ["run", "list", "get", "wait", "logs"],
    }.items():
        for action in actions:
            assert f"{group} {action}" in names
    assert {"exec", "shell"} <= names


@pytest.mark.parametrize("path", [p for p, _ in PARSERS], ids=lambda p: " ".join(p) or "bastion")
def test_help_has_examples(path: tuple[str, ...]) -> None:
    parser = dict(PARSERS)[path]
    text = parser.format_help()
    assert "examples:" in text
    examples = example_lines(text)
    assert examples, text
    for line in examples:
        argv = example_argv(line)
        if argv is None:
            continue
        try:
            build_parser([])[0].parse_args(argv)
        except SystemExit as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"example does not parse ({exc}): {line}")


def example_lines(help_text: str) -> list[str]:
    tail = help_text.split("examples:\n", 1)[1]
    lines = []
    for line in tail.splitlines():
        if not line.startswith("  "):
            break
        lines.append(line.strip())
    return lines


def example_argv(line: str) -> list[str] | None:
    """The arguments of the `bastion` command in an example line (a shell line:
    ``X=$(bastion ...)``, ``... | bastion ...``), placeholders filled in."""
    line = line.replace("$SID", "ses_example").replace("$JOB", "job_example")
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    for i, token in enumerate(tokens):
        if token == "bastion" and (i == 0 or tokens[i - 1] in ("(", "|", ";", "&&", "||")):
            argv = []
            for word in tokens[i + 1 :]:
                if word in (")", "|", ";", "&&", "||", ">", "<", "&"):
                    break
                argv.append(word)
            return argv
    return None


def test_example_argv() -> None:
    assert example_argv("SID=$(bastion sessions create --start -q)") == [
        "sessions",
        "create",
        "--start",
        "-q",
    ]
    assert example_argv("tar czf - . | bastion files upload - $SID:/tmp/x") == [
        "files",
        "upload",
        "-",
        "ses_example:/tmp/x",
    ]
    assert example_argv("bastion files download $SID:/a - | head -n 2") == [
        "files",
        "download",
        "ses_example:/a",
        "-",
    ]
    assert example_argv("bastion jobs run $SID --shell -- 'ls / | wc -l'  # n") == [
        "jobs",
        "run",
        "ses_example",
        "--shell",
        "--",
        "ls / | wc -l",
    ]
    assert example_argv("echo hi > x") is None
