"""A fork server for the suite's CLI runs: the script as a real process, without paying its imports each time.

Every `run_cli` call used to start a fresh interpreter that imports torch, transformers' Trainer and datasets
(~8 s on 2 cores) before doing a second of work; the suite makes ~260 such calls. This server imports those
libraries once, without running anything (no tensor op, so no OpenMP thread pool exists to be broken by
fork()), and then forks one child per request. The child is a real process with its own pid, environment,
working directory, stdout/stderr and exit status; it runs the script file fresh as `__main__` (runpy), so the
script's own module-level code runs again and its test hooks (FINANCE_TRAINER_INJECT_*, read when the run first
needs them) come from the request's environment exactly as in `python train_finance_ssc_model.py ...`. Only the
library modules are shared.

What a fork cannot reproduce, the caller sends to a plain subprocess instead (see `needs_fresh_interpreter`):
environment variables those libraries read at import time (HF_*, TRANSFORMERS_*, TORCH*, OMP_*, PYTHON*...),
`--debug` (the server imports with the script's quiet logging settings), and anything that hides packages.
`FINANCE_TRAINER_TEST_FORKSERVER=0` turns the server off for the whole suite.

Protocol (one JSON line each way on private pipes): request {"argv", "env", "cwd", "stdout", "stderr"};
replies {"pid": N} when the child exists, then {"rc": code} when it has exited (negative: killed by a signal,
as subprocess reports it).
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Read by torch/transformers/datasets/tokenizers/huggingface_hub when imported: a request that differs from the
# server's environment in any of these needs its own interpreter.
IMPORT_TIME_PREFIXES = ("PYTHON", "HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "KMP_",
                        "CUDA", "TOKENIZERS", "DATASETS", "ACCELERATE", "LD_", "HIDE_PACKAGES", "MPLBACKEND",
                        )  # not XDG_CACHE_HOME: the suite pins HF_HOME, so only the script reads it (at run time)


def _serve() -> None:
    """Runs in the server process: import, then fork one child per request."""
    proto_in = os.fdopen(os.dup(0), "r")
    proto_out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # a library that prints while importing must not write into the protocol
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import numpy  # noqa: F401
    import yaml  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import datasets  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments,  # noqa: F401
                              get_scheduler)
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    try:
        import peft  # noqa: F401
    except ImportError:
        pass
    try:  # the table of checkpoint key conversions (~1,000 regexes, ~0.4 s) that transformers builds on a process's
        # first from_pretrained and keeps: built once here, inherited by every child (pure Python, no tensors)
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        get_checkpoint_conversion_mapping("smollm3")
    except ImportError:
        pass
    import runpy
    compiled: dict = {}  # script path -> (mtime_ns, size, code): compiled here once, inherited by every fork
    proto_out.write(json.dumps({"ready": os.getpid()}) + "\n")
    proto_out.flush()
    for line in proto_in:
        req = json.loads(line)
        code = _compiled(req["argv"][0], compiled)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            proto_in.close()
            proto_out.close()
            _child(req, runpy, code)  # does not return: it ends this process as the script's exit would
        proto_out.write(json.dumps({"pid": pid}) + "\n")
        proto_out.flush()
        _, status = os.waitpid(pid, 0)
        proto_out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        proto_out.flush()


def _compiled(script: str, cache: dict):
    """The script's code object, compiled once per version of the file (path, mtime, size): compiling the ~9,000-line
    script took ~0.2 s of every run. Nothing is executed here; each child runs the code fresh as `__main__`."""
    st = os.stat(script)
    version = (st.st_mtime_ns, st.st_size)
    if cache.get(script, (None,))[0] != version:
        with open(script, "rb") as fh:
            cache[script] = (version, compile(fh.read(), script, "exec", dont_inherit=True))
    return cache[script][1]


def _child(req: dict, runpy, code) -> None:
    """Become `python SCRIPT ARGS...` in the request's directory, environment and output files, and exit as that
    process would."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    script = req["argv"][0]
    sys.argv = list(req["argv"])
    sys.path[0] = str(Path(script).resolve().parent)  # as `python SCRIPT` sets it
    status = 0  # the script fell off its end without sys.exit: exit 0, as Python does
    try:  # what runpy.run_path does with the source it compiles, with the code the server compiled once
        runpy._run_module_code(code, None, "__main__", pkg_name="", script_name=script)
    except SystemExit as e:
        status = _exit_status(e.code)
    except KeyboardInterrupt:  # uncaught: Python ends killed by SIGINT
        _exit_python_way()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    _exit_python_way()
    os._exit(status)


def _exit_status(code) -> int:
    """The exit status of `sys.exit(code)`, as the interpreter computes it (printing a non-integer code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _exit_python_way() -> None:
    """What Python's exit does before it tears the interpreter down: wait for non-daemon threads, run the atexit
    callbacks, flush stdio. The teardown itself (every object of torch, transformers and datasets freed, each page
    first copied on write) is skipped with os._exit: it took ~1.3 s of every forked run and has no effect anyone
    can see, while a fresh `python --help` takes 0.3 s."""
    import atexit
    import threading
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


class ForkServer:
    def __init__(self, env: dict):
        # what the script's setup_logging sets before its first heavy import; the server imports earlier, so it
        # is started with them (imported here in the client only: the server never imports the script)
        from train_finance_ssc_model import QUIET_LIBRARY_ENV
        self.quiet = QUIET_LIBRARY_ENV
        self.env = {**env, **{k: env.get(k, v) for k, v in self.quiet.items()}}
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=self.env, bufsize=1)
        ready = self._reply(timeout=300)
        if "ready" not in ready:
            raise RuntimeError(f"fork server did not start: {ready}")

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited (rc {self.proc.poll()})")
        return json.loads(line)

    def needs_fresh_interpreter(self, argv: list, env: dict) -> bool:
        if "--debug" in argv:
            return True
        env = {**self.quiet, **env}  # setup_logging sets them with setdefault
        keys = {k for k in (*env, *self.env) if k.startswith(IMPORT_TIME_PREFIXES)}
        return any(env.get(k) != self.env.get(k) for k in keys)

    def run(self, argv: list, env: dict, timeout: float, cwd: str | None = None) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="forkserver-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            self.proc.stdin.write(json.dumps({"argv": argv, "env": {**self.quiet, **env}, "cwd": cwd or os.getcwd(),
                                              "stdout": str(out), "stderr": str(err)}) + "\n")
            self.proc.stdin.flush()
            pid = self._reply(timeout=60)["pid"]
            try:
                rc = self._reply(timeout=timeout)["rc"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._reply(timeout=60)
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout,
                                                out.read_text(errors="replace"), err.read_text(errors="replace"))
            return subprocess.CompletedProcess([sys.executable, *argv], rc, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
