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
