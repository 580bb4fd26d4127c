"""CPU platform layer: lets Megatron-Core's CUDA-assuming code run on CPU tensors.

Layer: parallel/. Installed only when CUDA is absent (`install()` is a no-op on a GPU
machine), so nothing here can change GPU behaviour. It is what makes TP/PP/DP
correctness testable on a 2-core machine with gloo, and what runs the quick-start on a
laptop.

Where Megatron-Core 0.16.1 assumes CUDA, and what this module does about it
(measured, see shared/notes/megatron-core-on-cpu.md):

- `torch.cuda.current_device()` feeds `device=` of buffers (core attention, p2p
  tensors, optimizer) -> returns "cpu".
- literal `device="cuda"`, `Tensor.cuda()`, `.to("cuda")` (PP schedule token counters,
  optimizer flags, causal masks) -> a `TorchFunctionMode` rewrites them to CPU.
- `grad.type() == "torch.cuda.FloatTensor"` asserts (grad clipping, distributed
  optimizer) -> `Tensor.type()` with no argument reports the CUDA name of the dtype.
- the model-parallel RNG tracker keeps CUDA generator states -> `CpuRNGStatesTracker`
  keeps one CPU generator state per name; `fork()` swaps torch's CPU generator, so
  dropout inside TP regions differs per TP rank exactly as on GPU.
- streams/events (inference engine, resharding copy service), `synchronize`, nvtx
  -> inert stand-ins.
- activation recompute replays the forward inside `autograd.Function.backward`, where
  the autograd engine runs with an empty mode stack -> the mode is re-entered there.
- the unfused attention's cached causal mask (`get_default_causal_mask`, `device="cuda"`)
  -> a CPU version, since model forwards run in `fast_path()`, outside the mode.
- `torch.compile` folds `torch.cuda.current_device()` to a constant, but knows only the
  real function -> `teach_torch_compile()` adds the stand-in (else every compiled
  forward breaks its graph in Megatron's rotary embedding, which moves its inverse
  frequencies to `current_device()` whenever they sit on the CPU).

The mode's Python dispatch costs ~2.4 us per torch call, so the hot regions (model
forwards and the loss, the rollout engine's decode loop) run in `fast_path()` without it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: "CudaToCpuMode | None" = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "cuda:<int>" to torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


_TO_FUNCS = {torch.Tensor.to}
_CUDA_FUNCS = {torch.Tensor.cuda}
_TYPE_FUNCS = {torch.Tensor.type}


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs:
            if _is_cuda_device(kwargs.get("device")):
                kwargs = dict(kwargs, device="cpu")
            if kwargs.get("pin_memory"):
                # Pinned memory needs a CUDA driver; it only speeds up H2D copies anyway.
                kwargs = dict(kwargs, pin_memory=False)
        if func in _CUDA_FUNCS:
            return args[0]
        if func in _TO_FUNCS:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        elif func in _TYPE_FUNCS and len(args) == 1 and "dtype" not in kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, "torch.cuda.FloatTensor")
        return func(*args, **kwargs)


@contextlib.contextmanager
def device_mode():
    """Re-enter the CPU device mode (for code run by the autograd engine)."""
    if _MODE is None:
        yield
        return
    with CudaToCpuMode():
        yield


@contextlib.contextmanager
def fast_path():
    """Run a hot region (model forward, sampling) without the device mode.

    The mode costs ~2.4 us of Python dispatch per torch call, a fifth of a tiny model's
    decode step. The model's forward pass creates no tensor on a literal CUDA device
    (Megatron's literals sit in the schedules, optimizer, clipping, checkpointing), so
    regions that only run the model and pure-torch math need no rewriting; should one
    ever meet such a literal, torch raises "Torch not compiled with CUDA enabled" there,
    never a silent difference. Backward passes run with an empty mode stack anyway.
    """
    if _MODE is None or torch.overrides._get_current_function_mode() is not _MODE:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


class CpuEvent:
    """Stand-in for `torch.cuda.Event`: CPU work is synchronous, so record = timestamp."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "CpuEvent") -> float:
        return (end._t - self._t) * 1000.0  # milliseconds, as CUDA events report


class CpuStream:
    """Stand-in for `torch.cuda.Stream`: a single in-order CPU 'stream'."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        event = event or CpuEvent()
        event.record()
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEFAULT_STREAM = CpuStream()


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """Megatron's RNG tracker on CPU: one CPU generator state per name.

        `fork(name)` swaps torch's default CPU generator to the named state and back, so
        weights drawn or dropout applied inside a TP region use the per-TP-rank seed that
        `model_parallel_cuda_manual_seed` assigned — as the CUDA tracker does on GPU.
        """

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_name = self._current_state_name
            outer_state = torch.get_rng_state()
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


def _with_device_mode(backward):
    @functools.wraps(backward)
    def wrapped(ctx, *args):
        with device_mode():
            return backward(ctx, *args)

    wrapped._megarlhf_cpu = True
    return staticmethod(wrapped)


def _current_device() -> str:
    return "cpu"


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = _current_device
    cuda.synchronize = lambda device=None: None
    cuda.Event = CpuEvent
    cuda.Stream = CpuStream
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_stream = lambda stream: None
    cuda.empty_cache = lambda: None
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    cuda.nvtx.range_push = lambda msg: None
    cuda.nvtx.range_pop = lambda: None


@functools.lru_cache(maxsize=None)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _patch_megatron() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as transformer_utils

    # The unfused softmax's causal mask is built on a literal "cuda" device, inside the
    # model's forward, where `fast_path` runs without the device mode.
    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    # On CPU the "device" generator *is* torch's CPU generator.
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mp_random._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    for fn in (mp_random.CheckpointFunction, mp_random.CheckpointWithoutOutputFunction):
        if not getattr(fn.backward, "_megarlhf_cpu", False):
            fn.backward = _with_device_mode(fn.backward)


def install() -> bool:
    """Install the CPU layer if (and only if) CUDA is absent. Returns True if installed.

    Idempotent. Call it before building any Megatron-Core object; `megarlhf.parallel`
    does so when it initialises torch.distributed.
    """
    global _INSTALLED, _MODE
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    _patch_torch_cuda()
    _patch_megatron()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # stays on the (main thread's) mode stack for the process lifetime
    _INSTALLED = True
    return True


def teach_torch_compile() -> None:
    """Let `torch.compile` fold the CPU stand-in of `torch.cuda.current_device()` as it
    folds the real one. Its table is internal to torch, so this is best effort: without
    it, compiled forwards still run, with a graph break per call."""
    if not _INSTALLED:
        return
    try:
        from torch._dynamo.variables import torch as dynamo_torch

        dynamo_torch.constant_fold_functions_need_guards[_current_device] = None
        dynamo_torch.constant_fold_functions[_current_device] = None
    except (ImportError, AttributeError, TypeError):
        pass


def is_installed() -> bool:
    return _INSTALLED
