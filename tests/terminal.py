"""A command started as a terminal starts it, so that a test can press Ctrl-C."""

import os
import signal
import subprocess


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """`cmd` in its own process group (which Ctrl-C signals as a whole), with SIGINT at its default:
    a shell running the tests in the background ignores SIGINT, and children inherit that."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


def ctrl_c(proc: subprocess.Popen) -> None:
    """What Ctrl-C in a terminal does: SIGINT to the foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)
