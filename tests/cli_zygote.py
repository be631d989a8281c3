"""A process that has imported captionkit, torch and transformers once and forks a child for each
`python -m captionkit` the tests run (`forked_cli.captionkit`).

Each child is a real process: its own arguments, working folder, standard streams (files), exit
status and interpreter exit. What it saves is the import, about ten seconds of CPU per command on
a small machine. It reads one JSON request per line on stdin and answers two lines on stdout: the
child's process id when it starts, its exit status when it ends.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import sys
import threading
import traceback


def preload() -> None:
    """What nearly every command imports: the command line, torch, transformers' BLIP, torchvision."""
    import torchvision  # noqa: F401
    from transformers import BlipForConditionalGeneration, BlipProcessor  # noqa: F401

    import captionkit.cli  # noqa: F401
    import captionkit.models  # noqa: F401
    import captionkit.pipeline  # noqa: F401


def single_threaded() -> bool:
    """Forking is safe while no Python thread but this one runs. The idle pools numpy's OpenBLAS
    and OpenCV start on import hold no lock and are made again in the child, as in the workers
    PyTorch's DataLoader forks."""
    return threading.active_count() == 1


def become(request: dict) -> None:
    """In the child: the request's folder, streams and arguments, as `python -m captionkit` has."""
    os.chdir(request["cwd"])
    for fd, path, flags in ((0, request["stdin"], os.O_RDONLY),
                            (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    # new streams on the new files, encoded as the interpreter encodes its own in this environment
    sys.stdin = sys.__stdin__ = _stream(0, "r", sys.__stdin__)
    sys.stdout = sys.__stdout__ = _stream(1, "w", sys.__stdout__)
    sys.stderr = sys.__stderr__ = _stream(2, "w", sys.__stderr__, line_buffering=True)
    sys.path[0] = request["cwd"]
    sys.argv = ["captionkit", *request["args"]]


def run_command() -> None:
    runpy.run_module("captionkit", run_name="__main__", alter_sys=True)


def exit_like_python(command) -> None:
    """Run `command` and end the process as the interpreter ends it (exit status from SystemExit,
    a traceback and 1 for an error, death by SIGINT for an uncaught Ctrl-C; threads joined, atexit
    handlers run, streams flushed), without tearing down every module torch and transformers
    loaded, which takes seconds; a file left to the garbage collector to flush would lose its data
    here, and fail the test."""
    interrupted = False
    try:
        command()
        code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
        if end.code is not None and not isinstance(end.code, int):
            print(end.code, file=sys.stderr)
    except BaseException as error:
        traceback.print_exc()
        interrupted, code = isinstance(error, KeyboardInterrupt), 1
    threading._shutdown()  # the interpreter waits for threads that are not daemons
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _stream(fd: int, mode: str, like, line_buffering: bool = False):
    return open(fd, mode, buffering=1 if line_buffering else -1, encoding=like.encoding,  # noqa: SIM115
                errors=like.errors, closefd=False)


def serve() -> None:
    preload()
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    print(json.dumps({"ready": single_threaded()}), file=answer)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            answer.close()
            become(request)
            exit_like_python(run_command)
        print(json.dumps({"pid": pid}), file=answer)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=answer)


if __name__ == "__main__":
    serve()
