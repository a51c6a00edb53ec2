"""MEMO-style offload of saved activations (`parallel.activation_offload`), on any device.

MEMO (Zhao et al., arXiv 2407.12117, section 3-4; methods 7): per transformer layer, the layer input
and the attention output always go to host memory, and of every other tensor autograd saves, the
fraction alpha of its tokens; the rest is dropped in forward and recomputed in backward from the
stored input. This module does it through `torch.autograd.graph.saved_tensors_hooks` around each
of megatron's TransformerLayers, so it works for every family built from them and needs no kernel:

- pack (forward): parameters stay where they are; a tensor sharing the storage of the layer input or
  of the core attention's output is copied whole; any other tensor with a sequence dimension (the
  size of the input's first dimension, megatron's [s, b, h], or tp times it inside attention and
  the MLP under sequence parallelism) has its first alpha x s tokens copied, the rest dropped;
  tensors without one, and expanded views (stride 0), are copied whole. A region saved twice in one
  forward (the input, the attention output, each norm's rsqrt: every one of them is) is copied once,
  so the bytes moved are the memory model's (`parallel/memory.py`, tests/test_memory.py).
- unpack (backward): copies come back to the device; at the first dropped tensor of a layer, the
  layer's forward is run again from the stored input (same RNG states, the saved tensors captured in
  the order autograd packs them), and each dropped part is taken from that run. The result has the
  original shape and strides, so backward computes exactly what it would without offload (CPU:
  bit-identical losses, tests/test_memory.py).
- On a GPU the copies go to pinned host memory on a side stream (the device tensor is held until
  its copy's event has completed, at the next layer's forward) and, in backward, the previous
  layer's copies are prefetched on that stream while this layer's backward runs.

Recomputation here re-runs the whole layer (attention included): MEMO's own token-wise recomputation
skips the attention by reusing the stored output, which needs a custom layer; the bytes moved are
MEMO's. `bytes_to_host` and `bytes_dropped` report what one step moved and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class OffloadStats:
    """What the hooks did since the last `reset`."""

    bytes_to_host: int = 0
    """Bytes copied to host memory in forward."""
    bytes_dropped: int = 0
    """Bytes dropped in forward and recomputed in backward."""
    layers: int = 0
    """Layer forwards wrapped."""

    def reset(self) -> None:
        self.bytes_to_host = self.bytes_dropped = self.layers = 0


@dataclass
class _Split:
    """A saved tensor whose first `kept` tokens along `dim` are on the host."""

    host: torch.Tensor
    index: int
    dim: int
    kept: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device


@dataclass
class _Whole:
    """A saved tensor copied whole to the host."""

    host: torch.Tensor
    device: torch.device
    ready: Any = None
    """On a GPU: the event of its device-to-host copy."""
    back: torch.Tensor | None = None
    """On a GPU: the prefetched device copy."""


@dataclass
class _View:
    """A saved tensor whose bytes are (part of) a whole copy: the copy is shared by every saved view
    of the same storage region (the layer input, the attention output and the norms' rsqrt are each
    saved twice in a layer's forward: copied once)."""

    entry: _Whole
    shape: tuple
    stride: tuple
    flat: bool = True
    """The copy is the storage region itself (a dense or an expanded view: the view comes back with
    `as_strided`); else the view's own elements, compact (a view with gaps into a wider buffer,
    such as the value part of the fused QKV output: its region is three times its size)."""


@dataclass(eq=False)
class _Call:
    """One forward of one layer: what it saved and how to run it again."""

    offload: "ActivationOffload"
    forward: Any
    args: tuple
    kwargs: dict
    rng: dict
    packed: int = 0
    input: _View | None = None
    input_ptr: int = 0
    attention_ptr: set = field(default_factory=set)
    recomputed: list | None = None
    splits: dict = field(default_factory=dict)
    """{storage pointer: (handle, tensor)} of the split tensors saved so far in this forward: the
    attention kernel saves its output before the output is known to be it (see `note`)."""
    pending: list = field(default_factory=list)
    wholes: list = field(default_factory=list)
    seen: dict = field(default_factory=dict)
    """{(storage pointer, offset, extent, dtype, version[, shape, stride]): whole copy} and
    {("split", ..., shape, stride): split handle}: a region saved again is not copied again."""
    held: list = field(default_factory=list)
    """Every tensor packed in this forward, and the attention output, held until it ends, so that no
    address in `seen` or `attention_ptr` is reused by another tensor meanwhile (which would then
    pass for it); on a GPU `pending` holds them longer."""


class ActivationOffload:
    """The hooks for one model: `wrap(model)` once, then train as usual."""

    def __init__(self, alpha: float, device: torch.device, gathered: int = 1):
        """`gathered`: tp under sequence parallelism (inside attention and the MLP a tensor holds
        that many times the layer input's tokens), else 1."""
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.gathered = gathered
        self.device = device
        self.stats = OffloadStats()
        self.on_gpu = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.on_gpu else None
        self._calls: list[_Call] = []
        self._model: torch.nn.Module | None = None
        self._params: set[int] | None = None

    # ------------------------------------------------------------------ wiring

    def wrap(self, model: torch.nn.Module) -> int:
        """Wrap every megatron TransformerLayer in `model`; returns how many."""
        from megatron.core.transformer.transformer_layer import TransformerLayer

        # the parameters' storages are read at the first forward, not here: megatron's DDP wrapper,
        # built after this, moves every parameter into its contiguous buffer, and a stale address
        # can be reused by an activation, which would then pass for a weight (kept, never counted)
        self._model = model
        layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
        for layer in layers:
            layer.forward = self._wrapped(layer, layer.forward)
        return len(layers)

    def _wrapped(self, layer: torch.nn.Module, forward: Any):
        core = getattr(getattr(layer, "self_attention", None), "core_attention", None)

        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            self._settle()  # the previous layer's copies are done: free its device tensors
            call = _Call(offload=self, forward=forward, args=args, kwargs=kwargs, rng=_rng_state())
            hidden = args[0] if args else kwargs["hidden_states"]
            call.input_ptr = hidden.untyped_storage().data_ptr()
            handle = None
            if core is not None:
                def note(_module, _inputs, output):
                    out = output[0] if isinstance(output, tuple) else output
                    ptr = out.untyped_storage().data_ptr()
                    call.attention_ptr.add(ptr)
                    call.held.append(out)
                    for handle, tensor in call.splits.pop(ptr, ()):  # saved by the kernel itself
                        self._make_whole(call, handle, tensor)
                    call.splits.clear()  # the layer's other tensors stay split
                handle = core.register_forward_hook(note)
            try:
                with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: self._pack(call, t), lambda h: self._unpack(call, h)
                ):
                    out = forward(*args, **kwargs)
            finally:
                if handle is not None:
                    handle.remove()
                call.splits.clear()  # no device tensor outlives the forward through these
                call.seen.clear()
                call.held.clear()
            if self.on_gpu:  # the order of layers, for the prefetch in backward
                self._calls.append(call)
            self.stats.layers += 1
            return out

        return run

    # ------------------------------------------------------------------ forward

    def _pack(self, call: _Call, t: torch.Tensor) -> Any:
        index = call.packed
        call.packed += 1
        ptr = t.untyped_storage().data_ptr()
        if self._params is None:
            self._params = {p.untyped_storage().data_ptr() for p in self._model.parameters()}
        if isinstance(t, torch.nn.Parameter) or ptr in self._params:
            return t  # weights stay where they are
        call.held.append(t)
        seqs = (_seq_len(call), _seq_len(call) * self.gathered)
        # copied whole: the layer input, the attention output, an expanded view (stride 0)
        whole = ptr == call.input_ptr or ptr in call.attention_ptr or _span(t) < t.numel()
        dim = None if whole else next((d for d, n in enumerate(t.shape) if n in seqs), None)
        seq = 0 if dim is None else t.shape[dim]
        kept = round(self.alpha * seq)
        if dim is None or kept == seq:  # no sequence dimension, or alpha x s is every token
            view = self._whole(call, t)
            if ptr == call.input_ptr and call.input is None:
                call.input = view
            return view
        key = ("split",) + _region(t) + (tuple(t.shape), tuple(t.stride()))
        if key in call.seen:
            return call.seen[key]
        host = self._to_host(call, t.narrow(dim, 0, kept)).host if kept else t.new_empty(0)
        self.stats.bytes_dropped += (seq - kept) * t.numel() // seq * t.element_size()
        if call.input is None:  # the recomputation starts from the layer input: keep it
            call.input = self._whole(call, _hidden(call))
        handle = _Split(host=host, index=index, dim=dim, kept=kept, shape=tuple(t.shape),
                        stride=tuple(t.stride()), dtype=t.dtype, device=t.device)
        call.splits.setdefault(ptr, []).append((handle, t))
        call.seen[key] = handle
        return handle

    def _whole(self, call: _Call, t: torch.Tensor) -> _View:
        """`t` copied whole, or a view of the copy already made of the same storage region."""
        span = _span(t)
        flat = span <= t.numel()
        key = _region(t) if flat else _region(t) + (tuple(t.shape), tuple(t.stride()))
        entry = call.seen.get(key)
        if entry is None:
            src = torch.as_strided(t, (span,), (1,), t.storage_offset()) if flat else t
            entry = call.seen[key] = self._to_host(call, src)
        return _View(entry=entry, shape=tuple(t.shape), stride=tuple(t.stride()), flat=flat)

    def _make_whole(self, call: _Call, handle: _Split, t: torch.Tensor) -> None:
        """Copy the dropped tokens of a split tensor too (it turned out to be the attention output)."""
        seq = handle.shape[handle.dim]
        self.stats.bytes_dropped -= (seq - handle.kept) * t.numel() // seq * t.element_size()
        self.stats.bytes_to_host -= handle.kept * t.numel() // seq * t.element_size()
        handle.host = self._whole(call, t)
        handle.kept = seq

    def _to_host(self, call: _Call, t: torch.Tensor) -> _Whole:
        # dense with t's dimension order; compact where t has gaps (`_restore` gives its strides back)
        host = torch.empty_like(t, device="cpu", pin_memory=self.on_gpu)
        self.stats.bytes_to_host += t.numel() * t.element_size()
        entry = _Whole(host=host, device=t.device)
        if self.on_gpu:
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                entry.ready = torch.cuda.Event()
                entry.ready.record(self.stream)
            call.pending.append(t)  # the device tensor lives until its copy is done
        else:
            host.copy_(t)
        call.wholes.append(entry)
        return entry

    def _settle(self) -> None:
        for call in self._calls[-1:]:
            for entry in call.wholes:
                if entry.ready is not None:
                    entry.ready.synchronize()
            call.pending.clear()

    # ------------------------------------------------------------------ backward

    def _unpack(self, call: _Call, handle: Any) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        self._prefetch_before(call)
        if isinstance(handle, _View):
            return self._restore(handle)
        if isinstance(handle.host, _View):  # made whole (it was the attention output)
            return self._restore(handle.host)
        if call.recomputed is None:
            call.recomputed = self._recompute(call)
        full = call.recomputed[handle.index]
        out = torch.empty_strided(handle.shape, handle.stride, dtype=handle.dtype,
                                  device=handle.device)
        if handle.kept:
            out.narrow(handle.dim, 0, handle.kept).copy_(handle.host, non_blocking=self.on_gpu)
        rest = handle.shape[handle.dim] - handle.kept
        out.narrow(handle.dim, handle.kept, rest).copy_(full.narrow(handle.dim, handle.kept, rest))
        return out

    def _back(self, entry: _Whole) -> torch.Tensor:
        if entry.back is not None:  # prefetched on the side stream
            torch.cuda.current_stream(entry.device).wait_stream(self.stream)
            return entry.back
        return entry.host.to(entry.device, non_blocking=self.on_gpu)

    def _restore(self, view: _View) -> torch.Tensor:
        back = self._back(view.entry)
        if view.flat:
            return back.as_strided(view.shape, view.stride)
        out = torch.empty_strided(view.shape, view.stride, dtype=back.dtype, device=back.device)
        return out.copy_(back)

    def _prefetch_before(self, call: _Call) -> None:
        """GPU: start copying the previous layer's tensors back while this layer runs backward."""
        if not self.on_gpu or call not in self._calls:
            return
        position = self._calls.index(call)
        if position == 0:
            self._calls.remove(call)
            return
        earlier = self._calls[position - 1]
        with torch.cuda.stream(self.stream):
            for entry in earlier.wholes:
                if entry.back is None:
                    entry.back = entry.host.to(entry.device, non_blocking=True)
        self._calls.remove(call)

    def _recompute(self, call: _Call) -> list:
        """The layer's forward again from the stored input; every tensor autograd saves, in order."""
        captured: list = []
        hidden = self._restore(call.input).detach().requires_grad_(_hidden(call).requires_grad)
        args, kwargs = call.args, dict(call.kwargs)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        saved = _rng_state()
        _set_rng_state(call.rng)
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
                lambda t: captured.append(t) or t, lambda t: t
            ):
                call.forward(*args, **kwargs)
        finally:
            _set_rng_state(saved)
        if len(captured) != call.packed:
            raise RuntimeError(
                f"activation offload: the recomputed layer saved {len(captured)} tensors, the "
                f"forward {call.packed}; the layer is not deterministic in what it saves"
            )
        return captured

    def step_metrics(self) -> dict:
        """The step's offload figures for metrics.jsonl (then reset)."""
        out = {"offload/bytes_to_host": self.stats.bytes_to_host,
               "offload/bytes_recomputed": self.stats.bytes_dropped}
        self.stats.reset()
        return out

    def end_step(self) -> None:
        """Forget the step's layer calls (after the optimizer step)."""
        self._settle()
        self._calls.clear()


def _region(t: torch.Tensor) -> tuple:
    """The storage region a saved tensor reads, as of its current version (an in-place change in
    between makes it another region)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), _span(t), t.dtype, t._version)


def _span(t: torch.Tensor) -> int:
    """Elements from a tensor's first to its last in storage: its numel when dense, fewer when
    dimensions overlap (stride 0), more with gaps."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0


def _hidden(call: _Call) -> torch.Tensor:
    return call.args[0] if call.args else call.kwargs["hidden_states"]


def _seq_len(call: _Call) -> int:
    return _hidden(call).shape[0]  # megatron's [s, b, h] (the local part under SP)


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(),
             "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if state["tracker"]:
        get_cuda_rng_tracker().set_states(dict(state["tracker"]))
