"""The one attention function of the project.

Shapes: ``q, k, v`` are ``(B, H, L, D)`` (the SDPA layout). On CUDA the kernel is xformers'
``memory_efficient_attention`` (layout ``(B, L, H, D)``, converted here); elsewhere, or for what
xformers cannot take, it is ``torch.nn.functional.scaled_dot_product_attention``. The choice is made
from the tensors' device, never from whether ``import xformers`` succeeds alone: xformers can import
and still have no CUDA kernels (PyPI's xformers 0.0.35 wheel beside torch 2.11 on an H200 raised
"xFormers wasn't build with CUDA support" for every operator), so :func:`xformers_usable` runs one tiny
call per device first and falls back to SDPA with a warning that says what to install.
:func:`describe_backend` says, per device, which kernel :func:`attention` will use and why (``alit doctor``
prints it); xformers' own import-time warning is not printed (see :mod:`tokenizer.core.xformers_info`).

Masks (at most one of ``key_mask`` and ``seqlens``):
- ``key_mask``: bool ``(B, Lk)``, True where a key is real; padded keys get no attention weight.
- ``seqlens``: a packed batch (``B == 1``) of consecutive sequences with these lengths; attention
  stays inside each sequence (block-diagonal; with ``causal`` block-diagonal causal). No padding
  compute on CUDA.
- ``causal``: each query attends to keys at positions <= its own (within its sequence).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from .xformers_info import xformers_status

# Functions that run eagerly (a graph break) inside torch.compile'd blocks. torch.compiler.disable is applied by
# disable_in_compiled_code() when a compile is set up (tokenizer.core.compile), not at import: it imports
# torch._dynamo, about 1.3 s in every process (each Slurm job, DDP rank and CLI call), and most never compile.
_EAGER_UNDER_COMPILE: list[str] = []


def _eager_under_compile(fn):
    _EAGER_UNDER_COMPILE.append(fn.__name__)
    return fn


def disable_in_compiled_code() -> None:
    """Wrap the functions marked ``@_eager_under_compile`` in ``torch.compiler.disable`` (idempotent).

    The module's own callers look them up by name at call time, so compiled blocks see the wrapped ones."""
    module = globals()
    for name in _EAGER_UNDER_COMPILE:
        if not getattr(module[name], "_torchdynamo_disable", False):
            module[name] = torch.compiler.disable(module[name])

CLUSTER_PINS = "requirements/cluster-cu128.txt"  # the pin set whose xformers wheel has kernels (see that file)
Backend = Literal["auto", "sdpa", "xformers"]


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops
    except Exception:  # pragma: no cover - depends on the install
        return None
    return xops


def xformers_available() -> bool:
    """True when xformers imports (its kernels still need CUDA tensors; see :func:`xformers_usable`)."""
    return _xformers_ops() is not None


@functools.cache
def _probe(device: torch.device) -> str | None:
    """None when xformers' memory-efficient attention runs on ``device``, else why not."""
    xops = _xformers_ops()
    if xops is None:
        return "xformers does not import"
    try:
        x = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.float16)  # (B, L, H, D)
        xops.memory_efficient_attention(x, x, x)
    except Exception as e:  # NotImplementedError when the build has no kernels for this device
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        status = xformers_status()
        if not status.extension_loaded:  # the root cause, e.g. libcudart.so.12 missing beside a CUDA 13 torch
            reason += f"; its compiled extension did not load ({status.reason})"
        return reason
    return None


@_eager_under_compile  # a cached probe with a warning: never traced into a compiled block
def xformers_usable(device: torch.device | str) -> bool:
    """True when xformers' kernels run on ``device`` (probed once per device). When they do not, warn once
    (with the reason and the fix) and let :func:`attention` use SDPA there."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    first = device not in _warned
    reason = _probe(device)
    if reason is not None and first and xformers_available():
        _warned.add(device)
        warnings.warn(f"attention: xformers imports but does not run on {device} ({reason}); using PyTorch "
                      f"SDPA there. `alit doctor` says why; {CLUSTER_PINS} installs a torch whose xformers "
                      "wheel has kernels", RuntimeWarning, stacklevel=3)
    return reason is None


_warned: set[torch.device] = set()


@dataclass(frozen=True)
class BackendChoice:
    """Which kernel :func:`attention` (``backend="auto"``) runs on one device, and why."""

    device: str
    backend: str  # "xformers" or "sdpa"
    why: str
    sdpa_kernel: str  # the kernel SDPA itself picks there for a dense bf16/fp32 call (flash, efficient, math...)


def sdpa_kernel(device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel ``scaled_dot_product_attention`` picks on ``device`` for a dense (B, H, L, 64) ``dtype`` call
    (torch's own dispatcher, with the SDPA backends this process has enabled)."""
    from torch.nn.attention import SDPBackend

    q = torch.zeros(1, 8, 16, 64, device=device, dtype=dtype)
    try:
        choice = SDPBackend(torch._fused_sdp_choice(q, q, q))
    except Exception as e:  # a private dispatcher call: say so rather than fail
        return f"unknown ({type(e).__name__})"
    return choice.name.lower()


def describe_backend(device: torch.device | str) -> BackendChoice:
    """What :func:`attention` runs on ``device`` and why (probes xformers there without warning)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what the training recipes run
    kernel = sdpa_kernel(device, dtype)
    if device.type != "cuda":
        why = f"{device.type} tensors always use PyTorch SDPA (xformers' kernels are CUDA-only)"
        return BackendChoice(str(device), "sdpa", why, kernel)
    status = xformers_status()
    if not status.imports:
        return BackendChoice(str(device), "sdpa", f"xformers {status.summary()}; install {CLUSTER_PINS}", kernel)
    reason = _probe(device)
    if reason is None:
        return BackendChoice(str(device), "xformers", "a probe call of memory_efficient_attention ran", kernel)
    return BackendChoice(str(device), "sdpa", f"xformers does not run here: {reason}; see {CLUSTER_PINS}",
                         kernel)


def packed_mask(seqlens: Sequence[int], causal: bool, device: torch.device) -> torch.Tensor:
    """Dense bool ``(L, L)`` block-diagonal mask (True = attend) of a packed batch."""
    seg = torch.repeat_interleave(torch.arange(len(seqlens), device=device),
                                  torch.as_tensor(list(seqlens), device=device))
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.ones_like(allowed).tril()
    return allowed


@_eager_under_compile  # train.compile: a graph break here, not one recompilation per batch's seqlens
def _sdpa_packed(q, k, v, seqlens, causal) -> torch.Tensor:
    """A packed batch without a dense (L, L) mask: sequences of equal length form one SDPA batch each,
    so the cost grows with the sum of squared lengths, not the square of the total."""
    starts: dict[int, list[int]] = {}
    pos = 0
    for n in (int(s) for s in seqlens):
        starts.setdefault(n, []).append(pos)
        pos += n
    out = q.new_empty(q.shape)  # (1, H, L, D)
    for n, st in starts.items():
        idx = (torch.tensor(st, device=q.device)[:, None] + torch.arange(n, device=q.device)).reshape(-1)
        group = [rearrange(t[0][:, idx], "h (g n) d -> g h n d", n=n) for t in (q, k, v)]  # 3 x (g, H, n, D)
        o = F.scaled_dot_product_attention(*group, is_causal=causal)  # (g, H, n, D)
        out[0][:, idx] = rearrange(o, "g h n d -> h (g n) d")
    return out


def _sdpa(q, k, v, key_mask, seqlens, causal) -> torch.Tensor:
    mask = None
    if seqlens is not None:
        return _sdpa_packed(q, k, v, seqlens, causal)
    if key_mask is not None:
        mask = key_mask[:, None, None, :]
        if causal:
            lq, lk = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            causal = False
    elif causal and q.shape[-2] != k.shape[-2]:
        # queries are the last positions (KV-cache decoding): bottom-right aligned causal mask
        lq, lk = q.shape[-2], k.shape[-2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


@_eager_under_compile  # train.compile: xformers runs eager (a graph break), its masks are built from lists
def _xformers(q, k, v, key_mask, seqlens, causal) -> torch.Tensor:
    xops = _xformers_ops()
    fmha = xops.fmha
    q_, k_, v_ = (rearrange(t, "b h l d -> b l h d") for t in (q, k, v))  # xformers' layout
    bias = None
    if seqlens is not None:
        lens = [int(s) for s in seqlens]
        bias = (fmha.attn_bias.BlockDiagonalCausalMask if causal else fmha.attn_bias.BlockDiagonalMask
                ).from_seqlens(lens)
    elif key_mask is not None or (causal and q.shape[-2] != k.shape[-2]):
        b, lq, h, _ = q_.shape
        lk = k_.shape[1]
        # xformers wants the bias' last dim aligned to 8: allocate padded, use a view
        pad = (lk + 7) // 8 * 8
        full = torch.zeros(b, h, lq, pad, dtype=q.dtype, device=q.device)
        allowed = torch.ones(b, lq, lk, dtype=torch.bool, device=q.device)
        if key_mask is not None:
            allowed &= key_mask[:, None, :]
        if causal:
            allowed &= torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        bias = full[..., :lk]
        bias.masked_fill_(~allowed[:, None], float("-inf"))
    elif causal:
        bias = fmha.attn_bias.LowerTriangularMask()
    out = xops.memory_efficient_attention(q_, k_, v_, attn_bias=bias)  # (B, Lq, H, D)
    return rearrange(out, "b l h d -> b h l d")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None,
              seqlens: Sequence[int] | None = None, causal: bool = False,
              backend: Backend = "auto") -> torch.Tensor:
    """Scaled dot-product attention, ``(B, H, Lq, D) -> (B, H, Lq, D)``; see the module docstring."""
    if key_mask is not None and seqlens is not None:
        raise ValueError("attention: pass either key_mask (padded batch) or seqlens (packed batch), not both")
    if seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"attention: a packed batch has batch size 1, got {q.shape[0]}; "
                             "concatenate the sequences along the length axis")
        if sum(int(s) for s in seqlens) != q.shape[-2]:
            raise ValueError(f"attention: seqlens sum to {sum(int(s) for s in seqlens)} but the packed "
                             f"length is {q.shape[-2]}")
    if key_mask is not None and key_mask.dtype != torch.bool:
        raise TypeError(f"attention: key_mask must be bool (True = real key), got {key_mask.dtype}")
    use_xformers = backend == "xformers" or (backend == "auto" and q.is_cuda and xformers_usable(q.device))
    if use_xformers:
        if not q.is_cuda:
            raise RuntimeError("attention: the xformers backend needs CUDA tensors; use backend='sdpa' on CPU")
        if not xformers_available():
            raise RuntimeError("attention: backend='xformers' but xformers does not import here; "
                               "pip install xformers (see pyproject.toml) or use backend='auto'/'sdpa'")
        return _xformers(q, k, v, key_mask, seqlens, causal)
    return _sdpa(q, k, v, key_mask, seqlens, causal)
