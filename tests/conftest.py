import json

import pytest


# ----------------------------------------------------------------------------- synthetic world (data.py, synthetic.py)

@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A `--preset tiny` world built once per session: <dir>/data (splits, images, base_sft.jsonl)
    and <dir>/model (tokenizer, image processor, random-weight Qwen2.5-VL). Treat it as read-only."""
    import synthetic

    return synthetic.build(str(tmp_path_factory.mktemp("tiny_world")), preset="tiny", seed=0)


# ----------------------------------------------------------------------------- tiny checkpoints (model.py, model_mllama.py, generate.py)

@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    """tests/tiny.py's random-weight Qwen2.5-VL saved with save_pretrained. Seed 1: its greedy
    continuations vary (seed 0's repeat one token), which the EOS tests of generate.py need."""
    from tests import tiny

    path = tmp_path_factory.mktemp("vl")
    tiny.save_vl(path, seed=1)
    return path


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory):
    """tests/tiny_mllama.py's random-weight Llama 3.2 Vision with its tokenizer and image processor config."""
    from tests import tiny_mllama

    path = tmp_path_factory.mktemp("mllama")
    tiny_mllama.save(path)
    return path


# ----------------------------------------------------------------------------- FSDP2 on 2 gloo ranks

@pytest.fixture(scope="session")
def fsdp_checks(tmp_path_factory):
    """tests/fsdp_checks.py's results on tests/tiny.py's model, {check: [rank 0's, rank 1's]}: the 2-rank
    checks of test_fsdp.py and test_generate.py share one torchrun launch."""
    from tests import tiny
    from tests.test_fsdp import torchrun

    path = tmp_path_factory.mktemp("fsdp_vl")
    tiny.save_vl(path)
    return json.loads(torchrun("tests/fsdp_checks.py", path, timeout=300,
                               rerun_on_teardown_abort=True).strip().splitlines()[-1])


# ----------------------------------------------------------------------------- flash-attn's CUDA branches on CPU

@pytest.fixture
def flash_attn(monkeypatch):
    """tests/flash_attn_standin.py in place of flash-attn's kernels, model.use_flash open on CPU: the
    code's flash branches run here. Returns the list of the stand-in's calls, (function name, q dtype)."""
    from tests import flash_attn_standin

    return flash_attn_standin.install(monkeypatch)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread avoids oversubscription stalls on the shared cores (a module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
