"""launch.py: a script run in a forked process ends as `python script` ends it (the interpreter is the
oracle): exit status, a sys.exit message, a crash's traceback, argv and __name__, torch's threads from
the environment, non-daemon threads joined and atexit handlers run before the process ends."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests import scripts

SCRIPT = textwrap.dedent("""\
    import atexit, os, sys, threading
    atexit.register(lambda: print("atexit ran", flush=True))
    threading.Thread(target=lambda: (threading.main_thread().join(), print("thread done", flush=True))).start()
    print(__name__, os.path.basename(__file__), sys.argv[1:], os.path.basename(sys.path[0]), flush=True)
    mode = sys.argv[1]
    if mode == "threads":
        import torch
        print("threads", torch.get_num_threads(), flush=True)
    elif mode == "message":
        sys.exit("a message")
    elif mode == "status":
        sys.exit(3)
    elif mode == "crash":
        raise ValueError("boom")
    """)


@pytest.mark.parametrize("mode", ["threads", "message", "status", "crash"])
def test_a_forked_script_ends_as_the_interpreter_ends_it(tmp_path, mode):
    folder = tmp_path / "scripts_here"
    folder.mkdir()
    (folder / "probe.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # not the forkserver's count (the machine's, 2 here)
    fresh = subprocess.run([sys.executable, str(folder / "probe.py"), mode], env=env, capture_output=True, text=True,
                           cwd=tmp_path)
    forked = scripts.run(folder / "probe.py", [mode], cwd=tmp_path, env=env)
    assert forked.returncode == fresh.returncode == {"threads": 0, "message": 1, "status": 3, "crash": 1}[mode]
    assert forked.stdout == fresh.stdout
    assert fresh.stdout.splitlines()[0] == f"__main__ probe.py ['{mode}'] scripts_here"
    assert fresh.stdout.splitlines()[-2:] == ["thread done", "atexit ran"]
    if mode == "crash":  # the same traceback but for launch.py's and runpy's frames above the script's
        assert forked.stderr.startswith("Traceback (most recent call last):\n")
        script_frames = fresh.stderr.splitlines()[1:]
        assert forked.stderr.splitlines()[-len(script_frames):] == script_frames
    else:
        assert forked.stderr == fresh.stderr


PARENT = textwrap.dedent("""\
    import atexit, os, sys, tempfile
    import launch
    made = tempfile.TemporaryDirectory()  # removed by a finalizer at exit, as wandb's media folder is
    atexit.register(print, "the parent's handler", flush=True)
    for _ in range(2):
        with open(sys.argv[2], "a") as log:
            status = launch.run_forked(sys.argv[1], [], log)
        print(status, os.path.isdir(made.name), flush=True)
    """)
CHILD = textwrap.dedent("""\
    import atexit, tempfile
    own = tempfile.TemporaryDirectory()
    print(own.name, flush=True)
    atexit.register(print, "the child's handler", flush=True)
    """)


def test_a_child_leaves_its_parents_exit_handlers_to_the_parent_and_runs_its_own(tmp_path):
    """What the forking process made stays for its next children (a child that removed wandb's media
    folder at its end broke the next step's wandb tables); what the child made goes with it."""
    (tmp_path / "parent.py").write_text(PARENT)
    (tmp_path / "child.py").write_text(CHILD)
    parent = subprocess.run([sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "child.py"),
                             str(tmp_path / "children.log")], cwd=scripts.ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": scripts.ROOT})
    assert parent.stdout == "0 True\n0 True\nthe parent's handler\n", parent.stderr
    log = (tmp_path / "children.log").read_text().splitlines()
    assert log[1::2] == ["the child's handler"] * 2
    assert not any(os.path.exists(folder) for folder in log[::2])
