"""Our scripts started as their command lines start them, each in a process of its own, but forked
from a server that imported launch.PRELOAD once for the session (multiprocessing's forkserver): a
launch costs milliseconds instead of the 5-10 s a fresh interpreter spends importing torch and
transformers here. `start` is Popen's subset the tests use (poll, wait, kill, returncode) and `run`
subprocess.run's; the child sets the environment, folder and torch threads it is given and runs
`launch.run_script`. The README's commands themselves stay tested as typed: tests/test_pipeline.py
starts `python pipeline.py` with a fresh interpreter, and so do a few command-line tests."""

import multiprocessing
import os
import subprocess
import tempfile

import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_server = multiprocessing.get_context("forkserver")
_server.set_forkserver_preload([*launch.PRELOAD, "launch"])


def _child(script, argv, cwd, env, stdout_path, stderr_path):
    """The forked process: `python script *argv` in `cwd` with environment `env`, output to the files."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        with open(path, "w") as f:
            os.dup2(f.fileno(), fd)
    os._exit(launch.run_script(script, argv))


class Started:
    """A started script: poll() / wait() / kill() / returncode as subprocess.Popen's, and its output
    (`stdout`, `stderr`: text, once it has ended)."""

    def __init__(self, script, args, cwd, env):
        self._files = [tempfile.NamedTemporaryFile("w+", suffix=name) for name in (".out", ".err")]
        self._process = _server.Process(target=_child, args=(str(script), [str(a) for a in args], cwd, env,
                                                             *(f.name for f in self._files)))
        self._process.start()

    @property
    def returncode(self):
        return self._process.exitcode

    def poll(self):
        return self._process.exitcode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self._process.name, timeout)
        return self._process.exitcode

    def kill(self):
        self._process.kill()

    @property
    def stdout(self):
        return self._output(0)

    @property
    def stderr(self):
        return self._output(1)

    def _output(self, stream):
        if self.poll() is None:
            return None
        self._files[stream].seek(0)
        return self._files[stream].read()


def start(script, args=(), cwd=ROOT, env=None):
    """`python script *args` started in `cwd` with `env` (default: this process's environment)."""
    return Started(script, args, cwd, dict(os.environ if env is None else env))


def run(script, args=(), cwd=ROOT, env=None, timeout=None, check=False):
    """`python script *args` run to its end: subprocess.CompletedProcess with text stdout and stderr.
    A run past `timeout` seconds is killed and raises subprocess.TimeoutExpired; with `check`, a
    non-zero exit raises subprocess.CalledProcessError."""
    started = start(script, args, cwd, env)
    try:
        started.wait(timeout)
    except subprocess.TimeoutExpired:
        started.kill()
        started.wait()
        raise
    done = subprocess.CompletedProcess([script, *map(str, args)], started.returncode, started.stdout, started.stderr)
    if check:
        done.check_returncode()
    return done
