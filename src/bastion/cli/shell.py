"""``bastion shell``: the local terminal attached to a shell in a session."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import select
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

from .._client import Bastion
from .._exceptions import (
    TerminalError,
)
from .._terminal import Terminal
from .._terminal_base import DEFAULT_COLS, DEFAULT_ROWS
from ..wire import (
    TerminalMessage,
)
from .common import (
    EXEC_FAILED,
    Subparsers,
    add_remote_parser,
    error_line,
    remote_exit_status,
)
from .errors import ExitCode
from .format import (
    write_text,
)

#: After stdin ends, ``bastion shell`` sends Ctrl-D this often until the terminal
#: closes (one sent before the remote shell's line editor is up is lost), and gives up
#: sending after this long (then it only waits for the shell to end).
EOF_INTERVAL = 0.5
EOF_PATIENCE = 10.0

# --------------------------------------------------------------------------- shell


def add_shell_command(subparsers: Subparsers) -> None:
    shell = add_remote_parser(
        subparsers,
        "shell",
        help="attach this terminal to a shell in a session",
        description="Open an interactive shell in a running session, with this terminal "
        "in raw mode (keys go to the remote shell as typed; window resizes follow). "
        "Exits with the shell's exit status, or "
        f"{EXEC_FAILED} when bastion itself failed. Without a terminal on stdin, stdin "
        "is sent as input until it ends; then the shell gets Ctrl-D until it has ended.",
        examples=[
            "bastion shell $SID",
            "echo 'uname -a; exit 0' | bastion shell $SID",
            "bastion shell $SID < setup.sh",
            "bastion shell $SID --url http://sandbox-host:8080 --api-key $KEY",
        ],
    )
    shell.add_argument("session_id", metavar="SESSION")
    shell.set_defaults(runner=_shell)


def _shell(client: Bastion, args: argparse.Namespace) -> int:
    stdin_fd = sys.stdin.fileno()
    interactive = os.isatty(stdin_fd)
    out = sys.stdout

    def on_message(message: TerminalMessage) -> None:
        if message["type"] == "term_output":
            data = message["payload"].get("data")
            if isinstance(data, str):
                write_text(out, data)

    rows, cols = _window_size()
    terminal = client.terminal.connect(args.session_id, on_message, rows=rows, cols=cols)
    try:
        with _raw_mode(stdin_fd if interactive else None), _forward_resizes(terminal):
            _forward_input(terminal, stdin_fd)
            exit_info = terminal.wait()
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    finally:
        terminal.close()
    reason = exit_info.get("reason")
    status = exit_info.get("exit_code")
    if reason != "exited":
        ended = "the shell ended" + (" without an exit status" if status is None else "")
        error_line(f"bastion: {ended} ({reason})")
    return 1 if status is None else remote_exit_status(status)


@contextlib.contextmanager
def _raw_mode(fd: int | None) -> Iterator[None]:
    """Put the local tty in raw mode (keys go to the remote shell as typed, Ctrl-C
    included) and restore it however the block ends."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _forward_resizes(terminal: Terminal) -> Iterator[None]:
    """Send the local window size to the shell on each SIGWINCH."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def on_winch(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(TerminalError, ValueError):
            terminal.resize(*_window_size())

    previous = signal.signal(signal.SIGWINCH, on_winch)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


def _window_size() -> tuple[int, int]:
    """``(rows, cols)`` of the local terminal, 24x80 when there is none."""
    for stream in (sys.stdout, sys.stdin, sys.stderr):
        try:
            size = os.get_terminal_size(stream.fileno())
        except (AttributeError, OSError, ValueError):
            continue
        if size.lines > 0 and size.columns > 0:
            return size.lines, size.columns
    size = shutil.get_terminal_size((DEFAULT_COLS, DEFAULT_ROWS))
    return max(1, size.lines), max(1, size.columns)


def _forward_input(terminal: Terminal, fd: int) -> None:
    """Send what arrives on ``fd`` to the shell until it ends or the terminal closes.

    The loop wakes up every 0.1 s to notice a terminal that closed (the shell exited)
    while nothing was typed.  At the end of the input the shell gets Ctrl-D, which
    ends a shell reading from an empty line (see :func:`_end_input`).
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while not terminal.closed:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # e.g. EIO: the tty went away
            data = b""
        text = decoder.decode(data, final=not data)
        try:
            if text:
                terminal.send_input(text)
        except TerminalError:
            return  # closed meanwhile; wait() tells how
        if not data:
            _end_input(terminal)
            return


def _end_input(terminal: Terminal) -> None:
    """Send Ctrl-D every :data:`EOF_INTERVAL` seconds until the terminal closes.

    One Ctrl-D is not enough: sent before the remote shell's line editor is up (input
    that ends at once, ``bastion shell SID </dev/null``), it is lost and the shell
    would wait for ever.  After :data:`EOF_PATIENCE` seconds (a command of the input
    still runs), stop sending; the caller waits for the shell to end.
    """
    deadline = time.monotonic() + EOF_PATIENCE
    while not terminal.closed:
        try:
            terminal.send_input("\x04")
        except TerminalError:
            return  # closed meanwhile
        next_try = min(time.monotonic() + EOF_INTERVAL, deadline)
        while not terminal.closed and time.monotonic() < next_try:
            time.sleep(0.02)
        if time.monotonic() >= deadline:
            return
