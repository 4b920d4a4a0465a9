"""Helpers for the CUDA tests (tests/ops/test_cuda_ops.py, tests/test_cuda_pipeline.py)."""
import torch


def kernel_names(fn) -> list:
    """Names of the CUDA kernels that ``fn()`` launches (through the profiler): which implementation ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
