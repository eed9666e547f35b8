"""backend="auto" by measurement (models/backend_choice.py): the chooser with a stubbed timer, the
disk cache, the model hook; the GPU twin times both backends for real."""
import json

import pytest
import torch

from bionet_fast import BiONet
from bionet_fast.models import backend_choice as bc


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv(bc.CACHE_ENV, str(tmp_path / "cache" / "backend.json"))
    bc._memory.clear()
    yield
    bc._memory.clear()


def _stub(times: dict):
    calls = []

    def measure(backend: str) -> float:
        calls.append(backend)
        return times[backend]
    return measure, calls


def test_choose_measures_once_keeps_the_faster_and_caches_it(tmp_path):
    said = []
    measure, calls = _stub({"reference": 2.0e-3, "triton": 1.0e-3})
    assert bc.choose("k1", measure, say=said.append) == "triton"
    assert sorted(calls) == ["reference", "triton"] and len(said) == 1 and "triton" in said[0]
    data = json.loads(bc.cache_path().read_text())
    assert data["k1"]["backend"] == "triton" and data["k1"]["ms"] == {"reference": 2.0, "triton": 1.0}
    assert bc.choose("k1", measure, say=said.append) == "triton"  # this process: no new timing
    bc._memory.clear()  # a new process: read from disk, not measured, not said again
    assert bc.choose("k1", measure, say=said.append) == "triton"
    assert len(calls) == 2 and len(said) == 1
    measure2, _ = _stub({"reference": 1.0e-3, "triton": 5.0e-3})
    assert bc.choose("k2", measure2, say=said.append) == "reference"
    assert set(json.loads(bc.cache_path().read_text())) == {"k1", "k2"}  # both kept


def test_damaged_cache_is_measured_again(tmp_path):
    bc.cache_path().parent.mkdir(parents=True)
    bc.cache_path().write_text("{not json")
    measure, calls = _stub({"reference": 1.0, "triton": 2.0})
    assert bc.choose("k", measure, say=lambda m: None) == "reference" and len(calls) == 2
    assert json.loads(bc.cache_path().read_text())["k"]["backend"] == "reference"


def test_key_separates_settings():
    cfg = BiONet(iterations=2, multiplier=0.25, depth=2).config.to_dict()
    base = bc.choice_key("H200", cfg, 2, (64, 64), "bfloat16", True)
    assert base == bc.choice_key("H200", dict(cfg, backend="triton"), 2, (64, 64), "bfloat16", True)
    others = [bc.choice_key("A100", cfg, 2, (64, 64), "bfloat16", True),
              bc.choice_key("H200", dict(cfg, iterations=3), 2, (64, 64), "bfloat16", True),
              bc.choice_key("H200", cfg, 4, (64, 64), "bfloat16", True),
              bc.choice_key("H200", cfg, 2, (128, 64), "bfloat16", True),
              bc.choice_key("H200", cfg, 2, (64, 64), "float32", True),
              bc.choice_key("H200", cfg, 2, (64, 64), "bfloat16", False)]
    assert len({base, *others}) == 7


def test_measure_forces_the_backend_and_restores_the_model():
    torch.manual_seed(0)
    model = BiONet(iterations=2, multiplier=0.25, depth=2, backend="auto").train()
    x = torch.randn(2, 3, 32, 32)
    before = [b.clone() for b in model.buffers()]
    seen = []

    def timer(run):
        seen.append(model.resolved_backend(torch.device("cuda")))  # what a forward would run
        if seen[-1] == "reference":
            run()  # a real training pass (the fused one would need the Triton interpreter)
        return 1.0

    for backend in ("reference", "triton"):
        assert bc.model_measure(model, x, training=True, timer=timer)(backend) == 1.0
    assert seen == ["reference", "triton"]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert bc.forced_backend() is None


def test_cpu_auto_is_reference_without_measuring(monkeypatch):
    monkeypatch.setattr(bc, "choose", lambda *a, **k: pytest.fail("measured on the CPU"))
    model = BiONet(iterations=1, multiplier=0.25, depth=2, backend="auto")
    x = torch.randn(1, 3, 32, 32)
    assert model.resolved_backend(x.device, x) == "reference"
    model(x)
    monkeypatch.setenv("BIONET_FAST_BACKEND", "triton")
    assert model.resolved_backend(torch.device("cuda"), x) == "triton"  # the env var still forces


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU twin: needs CUDA")
def test_gpu_auto_measures_caches_and_keeps(capfd):
    torch.manual_seed(0)
    model = BiONet(iterations=2, multiplier=0.5, depth=3, backend="auto").cuda().train()
    x = torch.randn(2, 3, 128, 128, device="cuda")
    model(x).float().mean().backward()
    chosen = json.loads(bc.cache_path().read_text())
    assert len(chosen) == 1
    (entry,) = chosen.values()
    assert entry["backend"] in bc.BACKENDS and set(entry["ms"]) == set(bc.BACKENDS)
    assert "backend auto chose" in capfd.readouterr().err
    model(x).float().mean().backward()  # the same setting: no second measurement, no message
    assert "backend auto chose" not in capfd.readouterr().err
    assert model.resolved_backend(x.device, x) == entry["backend"]
