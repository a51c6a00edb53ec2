"""Mamba-2's state-space duality (SSD) scan: the chunked matmul form in pure PyTorch, and the GPU kernel.

`ssd_chunked` is the reference and the CPU path. It computes, for every head h with scalar decay
A_h < 0, step sizes dt_t > 0, input x_t (headdim P), and B_t, C_t (d_state N),

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        (state P x N, S_0 = initial state or 0)
    y_t = S_t C_t

in chunks of Q steps, as four matmuls (methods.md section 4, `ssd_minimal_discrete` of mamba_ssm):
the intra-chunk quadratic term with the decay mask exp(segsum), the per-chunk final states, the
inter-chunk recurrence (a segsum matmul over chunks) and the states' contribution to the outputs.

- The decay mask uses the stable segsum (mask first, then the cumulative sum of the masked repeat),
  not the difference of two cumulative sums, which loses digits when the cumulative log decay is
  large (exp(c_i - c_j) with |c| ~ 1e3 in a long chunk).
- A length not divisible by Q is padded with dt = 0 steps: decay exp(0) = 1 and input dt x = 0, so
  the padding changes neither the outputs before it nor the final state; the padded outputs are cut.
- B and C come per group (G groups, H / G heads each); they are repeated to heads before the
  einsums. (mamba_ssm's `ssd_minimal` indexes B, C by g and X by h in one einsum, which for G > 1
  silently sums over groups.)
- Computed in float32 at least (float64 stays float64), then cast back, like the kernels.

`mamba_chunk_scan` runs mamba_ssm's Triton kernel `mamba_chunk_scan_combined` where it imports on a
GPU (same arguments, same result up to float rounding; tests/test_mamba.py compares them, GPU-only),
else `ssd_chunked`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = x[..., j+1] + ... + x[..., i] for i >= j, -inf above the diagonal (stable)."""
    t = x.size(-1)
    x = x[..., None].expand(*x.shape, t)  # x[..., i, j] = x_i
    below = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~below, 0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(0)
    return out.masked_fill(~keep, float("-inf"))


def heads_from_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, l, G, n) -> (b, l, heads, n): head h reads group h // (heads / G)."""
    groups = t.size(2)
    if groups == heads:
        return t
    return t.repeat_interleave(heads // groups, dim=2)


def ssd_chunked(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk_size: int, initial_state: torch.Tensor | None = None, return_final_state: bool = False,
):
    """SSD outputs y (b, l, h, p) for x (b, l, h, p), dt (b, l, h) (after softplus), A (h,) < 0,
    B, C (b, l, g, n) with g dividing h; optionally the final state (b, h, p, n)."""
    out_dtype = x.dtype
    dtype = torch.promote_types(x.dtype, torch.float32)
    b, length, h, p = x.shape
    B = heads_from_groups(B, h).to(dtype)
    C = heads_from_groups(C, h).to(dtype)
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    pad = (-length) % chunk_size
    if pad:  # dt = 0 steps: no decay, no input (see the module docstring)
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    chunks = (length + pad) // chunk_size
    q = chunk_size
    X = (x * dt[..., None]).reshape(b, chunks, q, h, p)          # dt x
    Al = (dt * A).reshape(b, chunks, q, h).permute(0, 3, 1, 2)    # log decay, (b, h, c, q)
    B = B.reshape(b, chunks, q, h, -1)
    C = C.reshape(b, chunks, q, h, -1)
    A_cum = torch.cumsum(Al, dim=-1)

    # 1. intra-chunk: y_i = sum_{j<=i} exp(c_i - c_j) (C_i . B_j) dt_j x_j
    L = torch.exp(segsum(Al))                                     # (b, h, c, q, q)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * L
    y = torch.einsum("bhcls,bcshp->bclhp", scores, X)

    # 2. each chunk's final state from its own inputs
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)            # (b, h, c, q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)

    # 3. inter-chunk recurrence: the state entering each chunk (a segsum matmul over chunks)
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, :1])
    else:
        initial_state = initial_state.to(dtype)[:, None]
    states = torch.cat([initial_state, states], dim=1)          # (b, c+1, h, p, n)
    decay_chunk = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    entering, final = states[:, :-1], states[:, -1]

    # 4. the entering state's contribution: y_i += exp(c_i) C_i . S_in
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(A_cum))
    y = y.reshape(b, chunks * q, h, p)[:, :length].to(out_dtype)
    if return_final_state:
        return y, final.to(out_dtype)
    return y


def _kernel():
    """mamba_ssm's `mamba_chunk_scan_combined` where it imports and a GPU is present, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


def have_kernel() -> bool:
    """Whether `mamba_chunk_scan` runs the Triton kernel."""
    return _kernel() is not None


def mamba_chunk_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk_size: int, *, use_kernel: bool | None = None,
) -> torch.Tensor:
    """SSD outputs (b, l, h, p): the Triton kernel on a GPU where mamba_ssm imports, else
    `ssd_chunked` (`use_kernel` forces either; True without the kernel raises)."""
    kernel = _kernel()
    if use_kernel is None:
        use_kernel = kernel is not None and x.is_cuda
    if use_kernel:
        if kernel is None:
            raise RuntimeError("mamba_ssm's Triton kernels need a GPU and `pip install mamba-ssm`")
        # the kernel takes dt after softplus here (dt_softplus=False), B and C per group
        return kernel(x, dt, A, B, C, chunk_size)
    return ssd_chunked(x, dt, A, B, C, chunk_size)
