import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Tests import the stand-in for the official port from this folder.
sys.path.insert(0, str(Path(__file__).parent))
# Triton kernels run in the interpreter on machines without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# OpenVINO's converted and compiled models (engine.openvino_engine) go to a folder of this session,
# not the user's cache (a run of the suite must not grow ~/.cache)
os.environ.setdefault("BIONET_FAST_OPENVINO_CACHE", tempfile.mkdtemp(prefix="bionet-openvino-cache-"))

# OMP_NUM_THREADS wins (a shared machine: with OpenMP's spinning threads, two threads on two busy
# cores run many times slower than one)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


try:  # hypothesis: no per-example deadline (the Triton interpreter and a busy CI machine are slow)
    from hypothesis import settings

    settings.register_profile("bionet", deadline=None, print_blob=True)
    settings.load_profile("bionet")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny saved BiONet folder (predict's tests; a module may define its own `ckpt`)."""
    from bionet_fast.models import BiONet

    folder = tmp_path_factory.mktemp("ckpt") / "model"
    torch.manual_seed(0)
    BiONet(in_channels=3, classes=1, iterations=1, multiplier=0.125, depth=2, backend="reference").save_pretrained(folder)
    return folder
