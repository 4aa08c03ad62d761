"""The CPU compatibility layer: what it redirects, that it undoes itself, that CUDA disables it."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_eaopd.compat import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is off with CUDA")


@pytest.fixture
def compat():
    assert not cpu.is_cpu_compat_enabled()
    assert cpu.enable_cpu_compat() is True
    try:
        yield
    finally:
        cpu.disable_cpu_compat()


def test_device_placements_go_to_cpu(compat):
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.arange(4, device=0).device.type == "cpu"
    x = torch.randn(3)
    assert x.cuda() is x
    assert x.pin_memory() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to("cuda:1", torch.float64).dtype == torch.float64
    assert torch.empty(2, pin_memory=True).device.type == "cpu"
    # CPU requests are untouched.
    assert torch.tensor([1.0], device="cpu").device.type == "cpu"
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("x")
    torch.cuda.nvtx.range_pop()


def test_wall_clock_event(compat):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    time.sleep(0.02)
    t1 = time.perf_counter()
    end.record()
    end.synchronize()
    assert start.elapsed_time(end) >= (t1 - t0) * 1000.0
    with pytest.raises(RuntimeError):
        torch.cuda.Event().elapsed_time(end)


def test_cuda_rng_is_the_cpu_generator(compat):
    torch.cuda.manual_seed(3)
    a = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(a, torch.rand(4))
    state = torch.cuda.get_rng_state()
    b = torch.rand(4)
    torch.cuda.random.set_rng_state(state)
    assert torch.equal(b, torch.rand(4))


def test_megatron_rng_tracker_forks_the_cpu_generator(compat):
    from megatron.core import tensor_parallel

    seed = 17
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True
    )
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outside_ref = torch.Generator().manual_seed(seed)
    inside_ref = torch.Generator().manual_seed(seed + 2718)  # megatron's TP-region seed, tp_rank 0
    with tracker.fork():
        inside = torch.rand(5)
    outside = torch.rand(5)
    assert torch.equal(inside, torch.rand(5, generator=inside_ref))
    assert torch.equal(outside, torch.rand(5, generator=outside_ref))
    with tracker.fork():  # the tracked stream continues where it stopped
        assert torch.equal(torch.rand(5), torch.rand(5, generator=inside_ref))


def test_idempotent_and_fully_undone():
    originals = (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.Event)
    assert cpu.enable_cpu_compat() and cpu.enable_cpu_compat()
    cpu.disable_cpu_compat()
    assert not cpu.is_cpu_compat_enabled()
    assert (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.Event) == originals
    with pytest.raises((RuntimeError, AssertionError)):
        torch.empty(1, device="cuda")
    with cpu.cpu_compat() as active:
        assert active and torch.empty(1, device="cuda").device.type == "cpu"
    assert not cpu.is_cpu_compat_enabled()


def test_noop_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.cuda.current_device
    assert cpu.enable_cpu_compat() is False
    assert not cpu.is_cpu_compat_enabled()
    assert torch.cuda.current_device is before
