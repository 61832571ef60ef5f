"""CLI processes for the tests without the start-up: `run` and `Popen`, drop-ins for
subprocess's, start a `python -m difflab.cli.<name> ...` command as a fork of a warm process that
has already imported difflab's CLIs (torch, Lightning, Hydra: about 9 s of every process on a
2-core AVX2 CPU). The child is a real process: its own argv, working directory, environment,
stdin (empty), stdout/stderr, exit status, signal handlers and atexit handlers, and it runs the
module as `__main__` the way `python -m` does. What it shares with its siblings is what a fresh
process would import anyway. It differs from a fresh process in three ways, each undone here:
Python's and NumPy's global RNGs are re-seeded from the OS, OMP_NUM_THREADS is applied with
torch.set_num_threads (the OpenMP runtime read the variable when the warm process loaded it),
and PYTHONPATH is put on sys.path (a module the warm process already imported is not
re-imported: such a command needs a fresh process, `fresh=True`).

Any other command (torchrun, notebooks, `-c` code), `fresh=True`, or DIFFLAB_TEST_FRESH=1 in the
environment runs through `subprocess` unchanged. The warm process imports nothing of the test
and runs no tensor op before it forks, so no thread pool or lock is copied into a child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

PRELOAD = ("difflab.cli.train", "difflab.cli.sample", "difflab.cli.evaluate", "difflab.cli.export",
           "difflab.cli.ablate", "difflab.cli.ema_sweep", "difflab.cli.collect")


def _forkable(cmd: Any, fresh: bool) -> bool:
    return (not fresh and os.environ.get("DIFFLAB_TEST_FRESH") != "1" and isinstance(cmd, (list, tuple))
            and len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1] == "-m"
            and str(cmd[2]).startswith("difflab.cli.") and hasattr(os, "fork"))


class _Warm:
    """The warm process of this test process (one per xdist worker), started on first use."""

    _instance: Optional["_Warm"] = None

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=tempfile.gettempdir())
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the warm process did not start: {ready!r}")

    @classmethod
    def get(cls) -> "_Warm":
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def ask(self, **request: Any) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("the warm process ended")
        return json.loads(answer)


class Popen:
    """subprocess.Popen for `python -m difflab.cli.*` commands (see the module docstring);
    stdout/stderr are captured when given as subprocess.PIPE, else dropped."""

    def __init__(self, cmd, *, cwd=None, env=None, stdout=None, stderr=None, text=False, fresh=False, **kwargs):
        self.args, self.returncode = cmd, None
        self._real = None
        if not _forkable(cmd, fresh):
            self._real = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text, **kwargs)
            self.pid = self._real.pid
            return
        self._text, self._capture = text, (stdout == subprocess.PIPE, stderr == subprocess.PIPE)
        self._dir = tempfile.TemporaryDirectory(prefix="warm-")
        self._files = [os.path.join(self._dir.name, name) for name in ("stdout", "stderr")]
        env = dict(os.environ if env is None else env)
        self.pid = _Warm.get().ask(op="spawn", module=cmd[2], args=[str(a) for a in cmd[3:]],
                                   cwd=str(cwd or os.getcwd()), env=env, stdout=self._files[0],
                                   stderr=self._files[1])["pid"]

    def poll(self) -> Optional[int]:
        if self._real is not None:
            self.returncode = self._real.poll()
        elif self.returncode is None:
            self.returncode = _Warm.get().ask(op="wait", pid=self.pid, timeout=0)["returncode"]
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self._real is not None:
            self.returncode = self._real.wait(timeout)
        elif self.returncode is None:
            self.returncode = _Warm.get().ask(op="wait", pid=self.pid, timeout=timeout)["returncode"]
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def _read(self, index: int):
        if not self._capture[index]:
            return None
        data = Path(self._files[index]).read_bytes()
        return data.decode(errors="replace").replace("\r\n", "\n") if self._text else data

    def communicate(self, input=None, timeout: Optional[float] = None):
        if self._real is not None:
            out = self._real.communicate(input, timeout)
            self.returncode = self._real.returncode
            return out
        self.wait(timeout)
        out = self._read(0), self._read(1)
        self._dir.cleanup()
        return out

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run(cmd, *, cwd=None, env=None, capture_output=False, text=False, timeout=None, check=False, fresh=False,
        **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run for `python -m difflab.cli.*` commands (see the module docstring)."""
    if not _forkable(cmd, fresh):
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout,
                              check=check, **kwargs)
    pipe = subprocess.PIPE if capture_output else None
    proc = Popen(cmd, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=text)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, stdout, stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


# --------------------------------------------------------------------------- the warm process

def _serve() -> dict:
    """Import the CLIs, then answer spawn / wait requests (one JSON line each) until stdin
    closes. Returns only in a forked child, with its request."""
    import importlib
    import time

    requests, answers = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    for name in PRELOAD:
        importlib.import_module(name)
    answers.write("ready\n")
    answers.flush()
    for line in requests:
        request = json.loads(line)
        if request["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                requests.close()
                answers.close()
                return request
            answer = {"pid": pid}
        else:  # wait: the exit status, or None once the timeout has passed
            deadline = None if request["timeout"] is None else time.monotonic() + request["timeout"]
            while True:
                done, status = os.waitpid(request["pid"], os.WNOHANG)
                if done:
                    answer = {"returncode": os.waitstatus_to_exitcode(status)}
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    answer = {"returncode": None}
                    break
                time.sleep(0.02)
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    sys.exit(0)


def _become(request: dict) -> None:
    """In the forked child: the process `python -m <module> <args>` would have been."""
    import random
    import runpy

    import numpy as np
    import torch

    for fd, path, flags in ((1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(path, flags, 0o644), fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [request["cwd"], *extra, *_BASE_PATH]
    random.seed()
    np.random.seed()
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = [request["module"], *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    # sys.path as `python -m` in the repo would have it, less this folder and PYTHONPATH's entries.
    _skip = {os.path.dirname(os.path.abspath(__file__)), *os.environ.get("PYTHONPATH", "").split(os.pathsep)}
    _BASE_PATH = [p for p in sys.path[1:] if p and p not in _skip]
    _become(_serve())
