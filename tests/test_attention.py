"""The shared attention function: masks, packing, causal, and (on CUDA) xformers == SDPA."""

from __future__ import annotations

import math

import pytest
import torch

from tokenizer.core.attention import _probe, attention, packed_mask, xformers_usable


def reference(q, k, v, allowed):  # plain softmax attention with a bool (.., Lq, Lk) mask
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def _qkv(b, h, lq, lk, d, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device, dtype) for n in (lq, lk, lk)]


def test_key_mask_equals_unpadded() -> None:
    q, k, v = _qkv(3, 2, 7, 7, 8)
    lengths = torch.tensor([7, 4, 1])
    key_mask = torch.arange(7)[None] < lengths[:, None]
    out = attention(q, k, v, key_mask=key_mask)
    for i, n in enumerate(lengths.tolist()):
        alone = attention(q[i:i + 1, :, :n], k[i:i + 1, :, :n], v[i:i + 1, :, :n])
        torch.testing.assert_close(out[i:i + 1, :, :n], alone, atol=1e-5, rtol=1e-5)
    # padded keys really carry no weight: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 4:] = 100.0
    v2[1, :, 4:] = -100.0
    torch.testing.assert_close(attention(q, k2, v2, key_mask=key_mask), out)


def test_packed_equals_separate_and_causal() -> None:
    lens = [3, 5, 2]
    q, k, v = _qkv(1, 2, 10, 10, 8, seed=1)
    for causal in (False, True):
        out = attention(q, k, v, seqlens=lens, causal=causal)
        start = 0
        for n in lens:
            sl = slice(start, start + n)
            alone = attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], causal=causal)
            torch.testing.assert_close(out[:, :, sl], alone, atol=1e-5, rtol=1e-5)
            start += n
        torch.testing.assert_close(out, reference(q, k, v, packed_mask(lens, causal, q.device)), atol=1e-5,
                                   rtol=1e-5)


def test_causal_kv_cache_alignment() -> None:
    q, k, v = _qkv(2, 2, 6, 6, 8, seed=2)
    full = attention(q, k, v, causal=True)
    last = attention(q[:, :, -2:], k, v, causal=True)  # decoding the last two positions with a cache
    torch.testing.assert_close(last, full[:, :, -2:], atol=1e-5, rtol=1e-5)


def test_bad_arguments() -> None:
    q, k, v = _qkv(2, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="batch size 1"):
        attention(q, k, v, seqlens=[2, 2])
    with pytest.raises(ValueError, match="not both"):
        attention(q[:1], k[:1], v[:1], key_mask=torch.ones(1, 4, dtype=torch.bool), seqlens=[4])
    with pytest.raises(TypeError, match="bool"):
        attention(q, k, v, key_mask=torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="CUDA"):
        attention(q, k, v, backend="xformers")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: xformers kernels run only on GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_matches_sdpa_on_cuda(dtype: torch.dtype) -> None:
    if not xformers_usable("cuda"):
        pytest.skip(f"xformers has no CUDA kernels here ({_probe(torch.device('cuda', 0))}); SDPA is used")
    q, k, v = _qkv(2, 4, 33, 33, 64, device="cuda", dtype=dtype, seed=3)
    key_mask = (torch.arange(33, device="cuda")[None] < torch.tensor([33, 20], device="cuda")[:, None])
    for kwargs in ({}, {"causal": True}, {"key_mask": key_mask}):
        a = attention(q, k, v, backend="xformers", **kwargs)
        b = attention(q, k, v, backend="sdpa", **kwargs)
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    qp, kp, vp = (t[:1] for t in _qkv(1, 4, 30, 30, 64, device="cuda", dtype=dtype, seed=4))
    for causal in (False, True):
        a = attention(qp, kp, vp, seqlens=[10, 15, 5], causal=causal, backend="xformers")
        b = attention(qp, kp, vp, seqlens=[10, 15, 5], causal=causal, backend="sdpa")
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_xformers_without_kernels_falls_back_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """An xformers that imports but cannot run (no kernels for this torch/GPU) is probed once, warned about
    with the reason and the fix, and not used; a working one is used."""
    import tokenizer.core.attention as attn

    class Broken:
        calls = 0

        @classmethod
        def memory_efficient_attention(cls, *args: object) -> None:
            cls.calls += 1
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`\n details")

    class Working:
        @staticmethod
        def memory_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return q

    monkeypatch.setattr(attn, "_xformers_ops", lambda: Broken)
    attn._probe.cache_clear()
    monkeypatch.setattr(attn, "_warned", set())
    with pytest.warns(RuntimeWarning, match="No operator found.*using PyTorch SDPA"):
        assert not attn.xformers_usable("cpu")
    assert not attn.xformers_usable("cpu") and Broken.calls == 1  # probed once per device
    attn._probe.cache_clear()
    monkeypatch.setattr(attn, "_xformers_ops", lambda: Working)
    assert attn.xformers_usable("cpu")
    attn._probe.cache_clear()
