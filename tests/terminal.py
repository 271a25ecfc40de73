"""A command run in a real terminal: a detached tmux session on a private
tmux server, the screen captured once the command has exited. What an
operator at a terminal sees (progress bars) is tested here, and the same
command in a pipe beside it."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Screen:
    text: str       # the screen (and scrollback) as the terminal shows it
    exit_code: int


def run_in_terminal(argv: Sequence[str], *, cwd: str | None = None,
                    env: dict[str, str] | None = None, timeout: float = 120) -> Screen:
    """Run argv on a 200x50 tmux terminal (stdout and stderr both on it)
    and return what the terminal shows after it exits."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed for the terminal tests (apt-get install tmux)")
    socket = f"qrpay-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    marker = f"EXIT-{uuid.uuid4().hex[:8]}="
    command = (" ".join(shlex.quote(a) for a in argv)
               + f"; echo {marker}$?; sleep {int(timeout) + 10}")
    tmux = ["tmux", "-L", socket, "-f", "/dev/null"]
    environment = {**os.environ, **(env or {})}
    environment.pop("TMUX", None)
    subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "50", "-s", "t",
                    "-c", cwd or os.getcwd(), command], check=True, env=environment)
    try:
        deadline = time.monotonic() + timeout
        while True:
            shown = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", "t"],
                                   capture_output=True, text=True, check=True).stdout
            if marker in shown:
                code = int(shown.split(marker, 1)[1].split()[0])
                return Screen(shown.split(marker, 1)[0], code)
            if time.monotonic() > deadline:
                pytest.fail(f"{argv[:3]} did not finish on the terminal in {timeout} s:\n"
                            f"{shown}")
            time.sleep(0.2)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
