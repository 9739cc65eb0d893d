"""The CLI as a real process, started warm: a server that has imported align and the libraries it uses forks one
child per `python -m align ARGS` call, and the child runs the CLI's entry point with those arguments, in the caller's
working directory and environment, with its own stdout, stderr, exit code and interpreter exit (atexit handlers
included). What the fork skips is the 2.5-7 s of imports every cold `python -m align` pays before it does anything
(torch, transformers, peft, TRL, datasets): the suite runs a few hundred such commands on 2 cores.

Where a call could behave differently warm it runs cold instead (a plain `subprocess.run`): when its environment
differs from the server's in a variable the libraries read at import time (`HF_*`, `OMP_*`, `TORCH*`, ...).
Tests that signal, time or watch the process itself keep using `subprocess` directly.

Run as a script, this file is the server: one JSON request per stdin line, one JSON answer per stdout line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Read by a library when it is imported, not when it is used: a call whose environment changes one of these cannot
# share the server's imports.
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL", "KMP_", "GOMP",
                        "CUDA", "NVIDIA", "PYTHON", "TOKENIZERS", "DATASETS", "TRL", "ACCELERATE", "BITSANDBYTES",
                        "LD_", "XDG_", "HOME", "TMPDIR")
# Set by torch itself, in the test process, to the default it would use anyway: not a reason to go cold.
SET_BY_THE_LIBRARIES = {"TORCHINDUCTOR_CACHE_DIR"}
PRELOADED = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "align.cli", "align.artifacts",
             "align.recipe", "align.manifest", "align.data", "align.models", "align.training",
             "align.generation", "align.scoring", "align.evaluate", "align.stages.sft", "align.stages.pairs",
             "align.stages.reward", "align.stages.dpo", "align.stages.kto", "align.stages.orpo",
             "align.stages.simpo", "align.stages.grpo", "align.stages.rloo", "align.stages.ppo")


def import_time_differences(base: dict[str, str], env: dict[str, str]) -> list[str]:
    """The variables read at import time whose values differ between the server's environment and a call's."""
    keys = {key for key in base.keys() | env.keys() if base.get(key) != env.get(key)} - SET_BY_THE_LIBRARIES
    return sorted(key for key in keys if key.upper().startswith(IMPORT_TIME_PREFIXES))


class WarmCLI:
    """`run(args, cwd, env, timeout)` -> CompletedProcess, from a forked warm child where the environment allows."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.server: subprocess.Popen | None = None
        self.scratch = Path(tempfile.mkdtemp(prefix="warm-cli-"))
        self.calls = 0
        self.broken = False

    def _server(self) -> subprocess.Popen | None:
        """The running server, started on first use; None (every call cold, said once) if it cannot start."""
        if self.broken:
            return None
        if self.server is None or self.server.poll() is not None:
            self.server = subprocess.Popen([sys.executable, __file__], cwd=self.cwd, env=self.env, text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            ready = self.server.stdout.readline()
            if json.loads(ready or "{}").get("ready") is not True:
                self.broken = True
                print(f"warm CLI server did not start ({ready!r}): running every align command cold",
                      file=sys.stderr)
                return None
        return self.server

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """The completed process; its `forked` attribute says whether it came from the warm server."""
        command = [sys.executable, "-m", "align", *args]
        server = None if import_time_differences(self.env, env) else self._server()
        if server is None:
            result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
            result.forked = False
            return result
        self.calls += 1
        out, err = self.scratch / f"{self.calls}.out", self.scratch / f"{self.calls}.err"
        request = {"args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err),
                   "timeout": timeout}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        answer = json.loads(server.stdout.readline())
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        out.unlink()
        err.unlink()
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
        result = subprocess.CompletedProcess(command, answer["returncode"], stdout, stderr)
        result.forked = True
        return result

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.stdin.close()
            self.server.wait(timeout=60)
        for leftover in self.scratch.iterdir():
            leftover.unlink()
        self.scratch.rmdir()


def _child(request: dict) -> None:
    """In the forked child: become `python -m align ARGS` in the caller's directory and environment, and exit as
    an interpreter does (non-daemon threads joined, atexit handlers run, stdio flushed) but without tearing down
    every module: with torch imported that teardown alone takes ~2 s."""
    import atexit
    import runpy
    import traceback

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = [sys.executable, *request["args"]]  # runpy puts align/__main__.py first, as `-m` does
    code = 0
    try:
        runpy.run_module("align", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    """The child's exit code as subprocess reports it (-N for signal N), and whether it was killed for time."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL, True
        time.sleep(0.02)


def serve() -> None:
    import importlib

    for module in PRELOADED:
        importlib.import_module(module)
    # A fork copies only the forking thread: a library thread started at import would leave its locks held.
    if threading.active_count() != 1:
        raise SystemExit(f"threads running after the imports: {threading.enumerate()}")
    answers = os.fdopen(os.dup(1), "w")
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            answers.close()
            _child(request)
        returncode, timed_out = _wait(pid, request["timeout"])
        answers.write(json.dumps({"returncode": returncode, "timed_out": timed_out}) + "\n")
        answers.flush()


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # as `python -m align` has it, not this file's directory
    serve()
