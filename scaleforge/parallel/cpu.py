"""CUDA -> CPU redirection so megatron-core runs unchanged on a machine without a GPU.

megatron-core 0.16.1 calls CUDA unconditionally in about a hundred places. `install()` redirects the
few entry points that the dense/MoE training path actually reaches (measured with TP=2, TP=2+SP,
PP=2 1F1B, DP=2 + distributed optimizer, and checkpoint save/load, every loss within 5e-7 of one
process; MoE with EP=2 under both token dispatchers within 2.4e-7, tests/test_moe.py). It does nothing when CUDA is available: on a GPU everything is megatron's own code path.
Everything not listed here is megatron's real code path on the CPU too.
"""

from __future__ import annotations

import functools

_INSTALLED = False

# Tensor factories megatron calls with `device=torch.cuda.current_device()` or `device="cuda"`.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "empty_strided", "as_tensor", "linspace",
)


def needed() -> bool:
    """True when this process has no CUDA device (the redirection is then required)."""
    import torch

    return not torch.cuda.is_available()


def install() -> bool:
    """Apply the redirection once when CUDA is absent; returns whether it is active."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if not needed():
        return False
    import torch

    cuda = torch.cuda

    # parallel_state, tensor_parallel layers/mappings, optimizer and clip_grads allocate on
    # `torch.cuda.current_device()`, also inside autograd backward (sequence-parallel
    # reduce-scatter), so the answer must be a valid CPU device, not an index.
    cuda.current_device = lambda: "cpu"
    # pipeline_parallel.p2p_communication calls synchronize after every batch of isends (1F1B).
    cuda.synchronize = lambda device=None: None

    # tensor_parallel.random.CudaRNGStatesTracker.add and model_parallel_cuda_manual_seed seed and
    # read "the CUDA generator"; on CPU it is the default generator. manual_seed goes to the
    # generator itself: torch.manual_seed calls cuda.manual_seed_all, which would recurse.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state

    # schedules (loss tensors), transformer utils, the optimizer and clip_grads build tensors with
    # device="cuda". A TorchFunctionMode is not enough: modes are off inside
    # autograd.Function.backward, where tensor_parallel mappings allocate too.
    # `with torch.device(...)` forces its device on the constructors in a set torch builds (and
    # caches) on first use; built after the wrapping it would hold the wrappers, never match
    # torch's own functions again, and leave tensors meant for the meta device allocated but
    # uninitialised (transformers' from_pretrained: a RoPE buffer of garbage). Build it first.
    try:
        from torch.utils._device import _device_constructors
    except ImportError:  # a torch without the cached set
        pass
    else:
        _device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _cpu_factory(getattr(torch, name)))

    # clip_grads asserts `param.type() == "torch.cuda.FloatTensor"` and the distributed optimizer
    # raises "Wrapped parameters must be one of torch.cuda.FloatTensor..." otherwise.
    torch.Tensor.type = _cuda_type_name(torch.Tensor.type)
    # DistributedOptimizer.get_parameter_state_dp_zero (used by the model-space `fully_reshardable`
    # checkpoint format of scaleforge.pretrain.optimizer_state) moves its all-gather buffer with
    # `Tensor.cuda()`: "Torch not compiled with CUDA enabled" without this.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    _fake_streams(cuda)
    _redirect_megatron_rng()
    _define_missing_te_gemm()
    _int_alltoall_splits()
    _cpu_fsdp_mesh()
    _accurate_grad_norm()
    _INSTALLED = True
    return True


def _is_cuda(device) -> bool:
    import torch

    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return factory


def _cuda_type_name(original):
    @functools.wraps(original)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = dtype.replace("torch.cuda.", "torch.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _redirect_megatron_rng() -> None:
    # tensor_parallel.random's own get/set helpers reach torch.cuda.default_generators (absent on
    # a CPU build: without this, set silently does nothing and dropout under TP is wrong).
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def _define_missing_te_gemm() -> None:
    # moe_utils references `te_general_gemm` without defining it when Transformer Engine is
    # absent (NameError in the MoE router); None selects its plain-torch path.
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _FakeEvent:
    """A CUDA event on a machine where every op runs in order on the CPU: always complete."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end) -> float:
        return 0.0


class _FakeStream:
    """A CUDA stream without CUDA: work is already ordered, so waits and records do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _FakeEvent()

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _FakeStream()


def _fake_streams(cuda) -> None:
    import contextlib

    # MoEAlltoAllTokenDispatcher.__init__ builds `torch.cuda.Stream()` for its device-to-host copies
    # (token_dispatcher.py:445, "torch.cuda.Stream requires CUDA support" without this) and, in
    # _maybe_dtoh_and_synchronize, compares it with `current_stream()`, calls `wait_stream`, enters
    # `torch.cuda.stream(...)` and waits on `record_event()`'s event; SharedExpertMLP with
    # moe_shared_expert_overlap and Megatron-FSDP's overlapped reduce/gather do the same.
    cuda.Stream = _FakeStream
    cuda.Event = _FakeEvent
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()


def _accurate_grad_norm() -> None:
    # Without apex or Transformer Engine, megatron's gradient norm (clip_grads.get_grad_norm_fp32)
    # takes each gradient's `torch.norm`. torch's fp32 vector norm on the CPU accumulates far less
    # exactly than its sum: -1.48e-4 relative on the MoE example's 1M-element embedding gradient
    # (1 thread), where a sum of squares is within 1e-8 of float64. The error depends on the tensors'
    # lengths, so the grad norm and the clip coefficient differed between layouts (1.024665 one
    # rank, 1.024734 TP=2, 1.024783 DP=2, float64 1.024792), and clipped MoE runs drifted 7e-5 apart.
    # This is the same drop-in (`multi_tensor_applier(l2_norm_impl, ...)`) with each gradient's
    # squares summed in float64.
    try:
        from megatron.core.optimizer import clip_grads
    except ImportError:
        return
    import torch

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        total = torch.zeros((), dtype=torch.float64)
        for tensor in tensor_lists[0]:
            total += torch.sum(torch.square(tensor.float()), dtype=torch.float64)
        return torch.sqrt(total).float().reshape(1), None

    clip_grads.l2_norm_impl = l2_norm


def _int_alltoall_splits() -> None:
    # The alltoall dispatcher hands its per-rank token counts to all_to_all_single as split sizes.
    # On a GPU `maybe_move_tensor_to_cpu(..., as_numpy=True)` turns them into numpy arrays; for a
    # tensor already on the CPU it returns the tensor unchanged, and gloo's all_to_all_single then
    # rejects tensor split sizes (measured with EP=2). Converting CPU tensors too when numpy is asked
    # for gives gloo the same numpy splits a GPU run gets.
    try:
        from megatron.core.transformer.moe import token_dispatcher
    except ImportError:
        return
    original = token_dispatcher.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def to_cpu(tensor, as_numpy=False, record_stream=False):
        import torch

        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_cpu


def _cpu_fsdp_mesh() -> None:
    # Megatron-FSDP's adapter builds its DeviceMesh with device_type="cuda"
    # (mcore_fsdp_adapter.py:251/265/276); DTensor then asserts CUDA. The same mesh over the gloo
    # groups with device_type "cpu" runs (parallel.shard grads/full, within 2.4e-7 of one process).
    try:
        from megatron.core.distributed.fsdp import mcore_fsdp_adapter as adapter
    except ImportError:
        return
    mesh_cls = adapter.DeviceMesh

    class _CpuDeviceMesh:
        @staticmethod
        def from_group(group, device_type, *args, **kwargs):
            return mesh_cls.from_group(group, "cpu" if device_type == "cuda" else device_type,
                                       *args, **kwargs)

    adapter.DeviceMesh = _CpuDeviceMesh

    # MegatronFSDP.__init__ compares its device with `torch.device(f"cuda:{current_device()}")`
    # (megatron_fsdp.py:184) even when given one; "cuda:cpu" is no device string. During the
    # constructor the index is 0 (the comparison only logs); the model is placed on the device the
    # wrapper is given (torch.device("cpu"), pretrain/model_build.py).
    from megatron.core.distributed.fsdp.src.megatron_fsdp import megatron_fsdp

    import torch

    init = megatron_fsdp.MegatronFSDP.__init__

    @functools.wraps(init)
    def cpu_init(self, *args, **kwargs):
        current = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0
        try:
            init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current

    megatron_fsdp.MegatronFSDP.__init__ = cpu_init
