"""Every code block of the product page runs, verbatim, against a real `bastion serve`.

The page is docs/PRODUCT_PAGE.txt (the repo's copy of ../shared/PRODUCT_PAGE.txt, see
tests/unit/test_product_page_copy.py); its blocks are found by tests/examples.py
(:func:`page_blocks`), so a changed page is what runs.  Each example runs in a fresh
interpreter with only ``"bastion_url"`` and ``"your_api_key"`` filled in (and
``http://localhost:8080`` when the server is not on 8080, as in test_readme.py).  The
server has an API key; ``$BASTION_API_KEY`` holds it too, which is how the context
manager example, which names no key, reaches it.

Most snippets of the page are fragments that use names an earlier snippet defined
(``bastion``, ``session_id``, ``job_id``), or state one made (a terminal connected, a
file uploaded).  Running the page top to bottom in one interpreter would not work (the
Sessions section deletes the session the Jobs section then uses), so each snippet runs
on its own, after a prelude that sets up exactly what it uses and does not set up
itself (see :func:`prelude`):

* ``bastion``: a client, ``Bastion(base_url=URL, api_key=KEY)``;
* ``session_id``: a new session, started, unless the snippet starts it itself;
* ``job_id``: ``bastion.jobs.run(session_id, ["echo", "hello"])``, the page's own job;
* ``bastion.terminal.<method>`` without a ``connect`` in the snippet: a terminal
  connected with ``on_message=print``;
* ``bastion.files.delete(session_id, PATH)`` of a path it did not upload: ``PATH``
  uploaded first.

Each runs in an empty directory of its own, where a file it opens for reading by name
(``open("data.txt", "rb")``) exists.  The blocks that are data shapes (the Job Result
and Terminal Message formats) are checked against real results instead of run.
"""

from __future__ import annotations

import ast
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import ServerProcess
from tests.examples import (
    PRODUCT_PAGE,
    Block,
    docs_server,
    fill_in_url,
    page_blocks,
    run_example,
)

from bastion import Bastion, JobFailedError
from bastion.wire import TerminalMessage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API_KEY = "product-page-key-0123456789"
BLOCKS = page_blocks(PRODUCT_PAGE.read_text())
EXAMPLES = [b for b in BLOCKS if not b.is_format]
FORMATS = [b for b in BLOCKS if b.is_format]


def _id(block: Block) -> str:
    return f"line{block.line}-" + "".join(c if c.isalnum() else "_" for c in block.title)


@pytest.fixture(scope="module")
def page_server(data_root: Path) -> Iterator[ServerProcess]:
    srv = docs_server(data_root / "product-page", api_keys=(API_KEY,))
    srv.start()
    yield srv
    srv.delete_all_sessions()
    srv.stop()


# --------------------------------------------------------------------------- prelude


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def calls_of(tree: ast.AST, name: str) -> list[ast.Call]:
    return [c for c in _calls(tree) if _dotted(c.func) == name]


def _free_names(tree: ast.AST) -> set[str]:
    """Names the snippet reads but never binds (imports, assignments, defs, ``as``)."""
    bound: set[str] = set()
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound


def _str_args(call: ast.Call) -> list[str]:
    return [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def prelude(source: str, url: str, api_key: str) -> str:
    """What ``source`` needs run before it, as Python source (see the module docstring)."""
    tree = ast.parse(source)
    free = _free_names(tree)
    calls = {_dotted(c.func): c for c in _calls(tree)}
    lines: list[str] = []
    if "bastion" in free:
        lines.append("from bastion import Bastion")
        lines.append(f"bastion = Bastion(base_url={url!r}, api_key={api_key!r})")
    terminal = any(n.startswith("bastion.terminal.") for n in calls)
    needs_terminal = terminal and "bastion.terminal.connect" not in calls
    if "session_id" in free or needs_terminal:
        lines.append('session_id = bastion.sessions.create()["session_id"]')
        if "bastion.sessions.start" not in calls:
            lines.append("bastion.sessions.start(session_id)")
    if "job_id" in free:
        lines.append('job_id = bastion.jobs.run(session_id, ["echo", "hello"])["job_id"]')
    if needs_terminal:
        lines.append("bastion.terminal.connect(session_id=session_id, on_message=print)")
    uploaded = {p for c in calls_of(tree, "bastion.files.upload") for p in _str_args(c)}
    for call in calls_of(tree, "bastion.files.delete"):
        for path in sorted(set(_str_args(call)) - uploaded):
            lines.append(f"bastion.files.upload(session_id, b'from the prelude\\n', {path!r})")
    return "".join(line + "\n" for line in lines)


def _local_files_read(source: str) -> list[str]:
    return [name for call in calls_of(ast.parse(source), "open") for name in _str_args(call)[:1]]


def _fill_in(source: str, server: ServerProcess) -> str:
    """The snippet with only the server's URL and key filled in."""
    source = source.replace('"bastion_url"', repr(server.url))
    source = source.replace('"your_api_key"', repr(API_KEY))
    return fill_in_url(source, server)


# --------------------------------------------------------------------------- tests


def test_page_has_every_section() -> None:
    """The parser found the page's examples (a broken parser must not pass by finding none)."""
    titles = [b.title for b in EXAMPLES]
    assert len(EXAMPLES) >= 20, titles
    assert {"Quickstart", "Complete Example", "Or use a context manager:"} <= set(titles)
    assert len(FORMATS) >= 2, [b.title for b in BLOCKS]


def test_prelude_is_minimal() -> None:
    assert prelude("print(1)\n", "u", "k") == ""
    start = prelude("bastion.sessions.start(session_id)\n", "u", "k")
    assert "create()" in start and "start(" not in start.split("create()")[1]
    delete = prelude('bastion.files.delete(session_id, "/x")\n', "u", "k")
    assert delete.endswith("'/x')\n")


@pytest.mark.parametrize("block", EXAMPLES, ids=_id)
def test_product_page_example_runs(
    block: Block, page_server: ServerProcess, tmp_path: Path
) -> None:
    for name in _local_files_read(block.source):
        (tmp_path / name).write_text("data from the test\n")
    code = prelude(block.source, page_server.url, API_KEY) + _fill_in(block.source, page_server)
    result = run_example(code, page_server, api_key=API_KEY, cwd=tmp_path)
    where = f"{block.title!r} (line {block.line})"
    assert result.returncode == 0, f"{where} failed:\n{code}\n---\n{result.stdout}\n{result.stderr}"


# --------------------------------------------------------------------------- formats


def _matches(value: object, shape: ast.expr) -> bool:
    """Whether ``value`` has the shape a format block describes."""
    if isinstance(shape, ast.BinOp) and isinstance(shape.op, ast.BitOr):
        return _matches(value, shape.left) or _matches(value, shape.right)
    if isinstance(shape, ast.Constant):
        return bool(value == shape.value)
    if isinstance(shape, ast.Name):
        return isinstance(value, {"str": str, "int": int, "dict": dict, "list": list,
                                  "float": float, "bool": bool}[shape.id])  # fmt: skip
    if isinstance(shape, ast.Dict):
        return isinstance(value, dict) and all(
            isinstance(k, ast.Constant) and k.value in value and _matches(value[k.value], v)
            for k, v in zip(shape.keys, shape.values, strict=True)
        )
    raise AssertionError(f"a format block uses {ast.dump(shape)}")


def _format_shape(block: Block) -> ast.Dict:
    expr = ast.parse(block.source).body[0]
    assert isinstance(expr, ast.Expr) and isinstance(expr.value, ast.Dict)
    return expr.value


def _samples(server: ServerProcess) -> dict[str, list[object]]:
    """Real job results (queued or running, completed, failed) and terminal messages."""
    with Bastion(base_url=server.url, api_key=API_KEY) as bastion:
        sid = bastion.sessions.create()["session_id"]
        bastion.sessions.start(sid)
        jobs: list[object] = [bastion.jobs.run(sid, ["sleep", "1"])]
        jobs.append(bastion.jobs.get(sid, jobs[0]["job_id"]))  # type: ignore[index]
        jobs.append(bastion.jobs.run_and_wait(sid, ["echo", "hello"]))
        try:
            bastion.jobs.run_and_wait(sid, ["sh", "-c", "echo oops >&2; exit 3"])
        except JobFailedError as e:
            jobs.append(dict(e))
        messages: queue.Queue[TerminalMessage] = queue.Queue()
        bastion.terminal.connect(session_id=sid, on_message=messages.put)
        bastion.terminal.exec("echo hello")
        terminal: list[object] = []
        deadline = time.monotonic() + 10
        output = ""  # the typed line is echoed, then the command prints: two hellos
        while time.monotonic() < deadline and output.count("hello") < 2:
            try:
                message = messages.get(timeout=0.5)
            except queue.Empty:
                continue
            terminal.append(message)
            if message["type"] == "term_output":
                output += str(message["payload"].get("data", ""))
        bastion.terminal.close()
        bastion.sessions.delete(sid)
    assert len(jobs) == 4 and len(terminal) >= 2
    return {"job_id": jobs, "type": terminal}


@pytest.mark.parametrize("block", FORMATS, ids=_id)
def test_product_page_format_matches(block: Block, page_server: ServerProcess) -> None:
    shape = _format_shape(block)
    keys = {k.value for k in shape.keys if isinstance(k, ast.Constant)}
    samples = _samples(page_server)
    kind = next((k for k in samples if k in keys), None)
    assert kind is not None, f"{block.title!r}: which results does a format of {keys} describe?"
    for sample in samples[kind]:
        assert _matches(sample, shape), f"{block.title!r} does not describe {sample!r}"
