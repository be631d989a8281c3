"""`python -m captionkit ARGS` for the tests, each run in a process of its own.

The processes are forked from `cli_zygote`, which imported captionkit, torch and transformers
once, so a command costs its own work and not the ten seconds of imports. A run with another
environment than the zygote's, or where the zygote cannot fork safely, starts the interpreter as
users do. Tests of signals and pipes use `subprocess` themselves.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CLI = [sys.executable, "-m", "captionkit"]
ZYGOTE = Path(__file__).with_name("cli_zygote.py")


class Zygote:
    """The forking process, started on first use and ended with the test session."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.lock = threading.Lock()
        self.process = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                        env=self.env)
        self.usable = json.loads(self._answer(600))["ready"]

    def run(self, args: list[str], cwd: str, stdin: str, stdout: str, stderr: str,
            timeout: float) -> int:
        """The exit status of `captionkit ARGS` run by a forked child."""
        request = {"args": args, "cwd": cwd, "stdin": stdin, "stdout": stdout, "stderr": stderr}
        with self.lock:  # one command at a time: the answers come back in order
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = json.loads(self._answer(60))["pid"]
            try:
                return json.loads(self._answer(timeout))["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self._answer(60)
                raise

    def _answer(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(ZYGOTE), timeout)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the captionkit zygote exited")
        return line

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


_zygote: Zygote | None = None


def zygote() -> Zygote:
    global _zygote
    if _zygote is None or _zygote.process.poll() is not None:
        _zygote = Zygote()
        atexit.register(_zygote.close)
    return _zygote


def captionkit(*args, check: bool = True, input: str | None = None, env: dict | None = None,
               cwd: str | os.PathLike | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m captionkit ARGS` with its output captured as text, asserting exit status 0
    unless `check` is false."""
    argv = [str(arg) for arg in args]
    forker = zygote()
    wanted = dict(os.environ if env is None else env)
    if forker.usable and _same(wanted, forker.env):
        done = _forked(forker, argv, input, str(Path(cwd or os.getcwd()).resolve()), timeout)
    else:
        done = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=timeout,
                              input=input, env=env, cwd=cwd, check=False)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def _same(env: dict[str, str], zygotes: dict[str, str]) -> bool:
    """Whether a command in `env` may run forked from a zygote started in `zygotes`: libraries
    read the environment as they import, so only pytest's own note of the running test may differ."""
    def ours(environ: dict[str, str]) -> dict[str, str]:
        return {key: value for key, value in environ.items() if key != "PYTEST_CURRENT_TEST"}

    return ours(env) == ours(zygotes)


def _forked(forker: Zygote, argv: list[str], input: str | None, cwd: str,
            timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="ck-cli-") as folder:
        streams = {name: os.path.join(folder, name) for name in ("stdin", "stdout", "stderr")}
        for name, path in streams.items():
            Path(path).write_text((input or "") if name == "stdin" else "")
        code = forker.run(argv, cwd, streams["stdin"], streams["stdout"], streams["stderr"], timeout)
        stdout, stderr = (Path(streams[name]).read_text(errors="replace") for name in ("stdout", "stderr"))
    return subprocess.CompletedProcess([*CLI, *argv], code, stdout, stderr)
