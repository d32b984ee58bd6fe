"""Our scripts run as forks of a process that imported the heavy libraries once.

`python train_grpo.py ...` spends 5-10 s of a 2-core CPU importing torch, transformers' tokenizer and
image processors, math-verify and wandb before its first line of work: most of a miniature step's
time. pipeline.py forks each step from itself (`run_forked`), and the tests start scripts from a
fork server that imported PRELOAD (tests/scripts.py). Each step is still a process of its own (its
memory, threads, environment and exit status), started in milliseconds instead.

Two rules make a fork behave as a fresh `python script.py`: the forking process imports but never
computes (torch's thread pools do not survive a fork), and it holds none of the project's modules a
script could need from another checkout: the tests' server imports none (tests/test_ablation.py runs
a patched clone's scripts from it), pipeline.py only train_utils of its own checkout, whose scripts it
runs. This module imports only the standard library at its top.
"""

import atexit
import importlib
import os
import runpy
import sys
import threading
import traceback
import weakref

# what our scripts import, heaviest first; a name the installed transformers lacks is skipped
# (4.x has no PIL-backed image processor modules)
PRELOAD = ("torch", "transformers.models.auto.tokenization_auto",
           "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
           "transformers.models.mllama.image_processing_pil_mllama", "math_verify", "wandb", "PIL.Image")


def preload():
    """Import PRELOAD here, in the process that will fork. A fork must not inherit an initialised CUDA
    driver (a GPU step would fail to start): should a library ask whether CUDA is available while it
    is imported, NVML answers, not the CUDA runtime (torch's switch for processes that fork)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def torch_threads():
    """The intra-op threads torch starts with in a fresh process: OMP_NUM_THREADS, else MKL_NUM_THREADS,
    else the CPUs this process may run on. A fork inherits its parent's count, read when torch was
    imported, so `run_script` sets it again from the child's environment."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    return len(os.sched_getaffinity(0))


def forget_parents_exit_handlers():
    """In a forked child: the atexit handlers and finalizers registered so far are the parent's, for
    what the parent made (wandb's media folder, made when wandb is imported, is removed by one): they
    run when the parent exits, not when each child does, or a child would remove what its siblings
    use. The handlers the child's own script registers run at its end, as in a fresh process."""
    atexit._clear()
    for finalizer in list(weakref.finalize._registry):
        finalizer.atexit = False
    weakref.finalize._registered_with_atexit = False  # the child's first finalizer registers again


def run_script(script, argv):
    """Exit status of `python script *argv`, run in this (forked) process as the interpreter runs it:
    the script's folder first on sys.path, torch's threads from the environment, SystemExit's status
    (a message goes to stderr, status 1), an uncaught exception's traceback on stderr (status 1), then
    non-daemon threads joined, the script's atexit handlers run and stdout/stderr flushed."""
    import torch

    forget_parents_exit_handlers()
    torch.set_num_threads(torch_threads())
    sys.argv = [script, *argv]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: B036 (a crash, as the interpreter reports it)
        traceback.print_exc()
        status = 1
    threading._shutdown()  # what the interpreter does at exit, in this order
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def run_forked(script, argv, output):
    """`python script *argv` as a fork of this process, its stdout and stderr into the open file
    `output`; returns its exit status (as subprocess's returncode: -N for a signal N)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns to the caller's code
        status = 1
        try:
            os.dup2(output.fileno(), 1)
            os.dup2(output.fileno(), 2)
            status = run_script(script, argv)
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
