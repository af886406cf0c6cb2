"""Terminal echo round trip: one typed character until it comes back as output.

A terminal is connected (the session's login shell on a pty), the shell is replaced
by ``cat`` (``exec cat``) so that no prompt or line editor adds output, and then single
characters are sent one at a time: the pty echoes each one at once, and the time from
``send_input(c)`` to the ``term_output`` message carrying ``c`` (taken in the SDK's
reader thread as it arrives) is one sample.  That is the path of every keystroke:
SDK -> WebSocket -> server -> agent -> pty -> agent -> server -> WebSocket -> SDK.
"""

from __future__ import annotations

import string
import threading
import time
from typing import Any

from bastion import Terminal, TerminalMessage
from bench.context import Context
from bench.stats import summarize


class _Output:
    """Terminal output as it arrives, each piece with its arrival time."""

    def __init__(self) -> None:
        self.pieces: list[tuple[float, str]] = []
        self.cond = threading.Condition()

    def on_message(self, message: TerminalMessage) -> None:
        if message["type"] != "term_output":
            return
        now = time.perf_counter()
        data = str(message["payload"].get("data", ""))
        with self.cond:
            self.pieces.append((now, data))
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.pieces)

    def wait_for(self, text: str, since: int, timeout: float) -> float:
        """Arrival time of the first piece after ``since`` that contains ``text``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            seen = since
            while True:
                for at, data in self.pieces[seen:]:
                    if text in data:
                        return at
                seen = len(self.pieces)
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "".join(d for _, d in self.pieces[-5:])
                    raise TimeoutError(f"no echo of {text!r} within {timeout} s (last: {tail!r})")
                self.cond.wait(left)

    def wait_for_total(self, text: str, since: int, timeout: float) -> None:
        """Wait until the output after ``since``, joined, contains ``text``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while text not in "".join(d for _, d in self.pieces[since:]):
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "".join(d for _, d in self.pieces[since:])[-300:]
                    raise TimeoutError(
                        f"cat did not write the typed line back within {timeout} s: {tail!r}"
                    )
                self.cond.wait(left)


def _start_cat(term: Terminal, output: _Output, timeout: float = 30.0) -> None:
    """Replace the shell by ``cat`` and make sure it is the one reading: a line typed to
    ``cat`` comes back twice (the pty's echo, then cat's copy).  Input typed while the
    shell still owns the terminal may be flushed when it hands it over, so ask again
    until the answer comes."""
    term.send_input("exec cat\n")
    deadline = time.monotonic() + timeout
    while True:
        since = output.mark()
        term.send_input("ready\n")
        try:
            output.wait_for_total("ready\r\nready\r\n", since, timeout=1.0)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cat did not start within {timeout} s") from None


def run(ctx: Context) -> dict[str, Any]:
    samples_wanted, warmup = (200, 20) if ctx.quick else (500, 30)
    out: dict[str, Any] = {}
    output = _Output()
    with ctx.client() as client, ctx.sessions(client, 1) as (sid,):
        with ctx.timed() as t:
            term = client.terminal.connect(session_id=sid, on_message=output.on_message)
        out["connect_ms"] = round(t[0], 3)
        try:
            _start_cat(term, output)
            ctx.say(f"terminal echo x{samples_wanted} (+{warmup} warm-up)")
            samples = []
            letters = string.ascii_lowercase
            # A canonical-mode line holds 4095 characters: stay well below.
            for i in range(warmup + samples_wanted):
                char = letters[i % len(letters)]
                since = output.mark()
                start = time.perf_counter()
                term.send_input(char)
                arrived = output.wait_for(char, since, timeout=5)
                if i >= warmup:
                    samples.append((arrived - start) * 1000.0)
            # The echoes came from the pty: Enter hands the whole line to cat, which
            # writes it back once more.
            typed = "".join(letters[i % len(letters)] for i in range(warmup + samples_wanted))
            since = output.mark()
            term.send_input("\n")
            output.wait_for_total(typed, since, timeout=5)
            out["verified"] = True
        finally:
            term.close()
    out["echo"] = summarize(samples, "ms")
    return out
