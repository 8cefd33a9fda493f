"""The AR prior's static KV cache: one-position decoding (``Transformer.step``) equals the cached and the
recomputed forward, writes in place into buffers allocated once, runs the CFG pairs as one batch per
slot, and sampling gives exactly the same tokens with and without it (CFG, top-k/top-p, mixed and
generated budgets)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from generator.ar import AR
from generator.tasks import build_prior
from generator.transformer import KVCache
from sampling.ar_sampler import ARSampler
from sampling.schedules import Ramp

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)

C = 3  # classes


def _model(tokens_per_iter: int = 8, num_budgets: int = 4, codebook_size: int = 64, seed: int = 0,
           **overrides: object) -> AR:
    """A tiny AR prior with a random head (peaked, varied predictions), in eval mode."""
    torch.manual_seed(seed)
    model = build_prior("ar", "tiny", codebook_size=codebook_size, tokens_per_iter=tokens_per_iter,
                        num_budgets=num_budgets, num_classes=C, **overrides)
    torch.nn.init.normal_(model.head.weight, std=0.4)
    return model.eval()  # type: ignore[return-value]


@torch.no_grad()
def test_step_equals_forward_and_writes_in_place() -> None:
    """Each step's output equals the module forward over the same cache and a full causal recompute; the
    key/value buffers are allocated once (same storage every step) and hold the forward's keys/values."""
    model = _model()
    tr = model.transformer
    torch.manual_seed(1)
    b, n, width = 3, 12, model.config.width
    x = torch.randn(b, n, width)
    fast, ref = model.new_cache(), model.new_cache()
    tr(x[:, :2], causal=True, cache=fast)  # the prefix allocates the buffers
    tr(x[:, :2], causal=True, cache=ref)
    storage = [(fast.keys[i].data_ptr(), fast.values[i].data_ptr()) for i in range(len(tr.blocks))]
    for t in range(2, n):
        out = tr.step(x[:, t], fast)  # (B, W)
        torch.testing.assert_close(out, tr(x[:, t: t + 1], causal=True, cache=ref)[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, tr(x[:, : t + 1], causal=True)[:, -1], atol=1e-5, rtol=1e-5)
        assert fast.length == ref.length == t + 1
        assert [(fast.keys[i].data_ptr(), fast.values[i].data_ptr()) for i in range(len(tr.blocks))] == storage
    for i in range(len(tr.blocks)):
        assert fast.keys[i].shape == (b, model.config.heads, fast.max_len, width // model.config.heads)
        torch.testing.assert_close(fast.keys[i][:, :, :n], ref.keys[i][:, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.values[i][:, :, :n], ref.values[i][:, :, :n], atol=1e-5, rtol=1e-5)


def test_step_refuses_what_it_cannot_do() -> None:
    model = _model()
    x = torch.randn(2, model.config.width)
    with pytest.raises(ValueError, match="holds nothing yet"):  # no prefix run through this cache
        model.transformer.step(x, model.new_cache())
    full = KVCache(max_len=2)
    with torch.no_grad():
        model.transformer(torch.randn(2, 2, model.config.width), causal=True, cache=full)
        with pytest.raises(ValueError, match="overflow"):
            model.transformer.step(x, full)
        model.train()
        with pytest.raises(ValueError, match="eval-mode"):
            model.transformer.step(x, full)


def _count_calls(model: AR, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record (``forward`` | ``step``, rows) of every transformer call."""
    calls: list[tuple[str, int]] = []
    tr = model.transformer

    def wrap(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def recorded(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            calls.append((name, x.shape[0]))
            return fn(x, *args, **kwargs)
        return recorded

    monkeypatch.setattr(tr, "forward", wrap("forward", tr.forward))
    monkeypatch.setattr(tr, "step", wrap("step", tr.step))
    return calls


def test_cfg_pairs_run_as_one_batch_per_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """With guidance the conditional and unconditional rows go through the transformer together: the prefix
    once, then one single-position step per slot, each over all 2B rows."""
    model = _model()
    calls = _count_calls(model, monkeypatch)
    budgets, classes = [32, 8, 16], torch.tensor([0, 1, 2])
    ARSampler(cfg_scale=1.5, top_k=10).sample(model, budgets, classes, generator=torch.Generator().manual_seed(0))
    assert calls == [("forward", 6)] + [("step", 6)] * 31
    calls.clear()
    ARSampler(cfg_scale=0.0).sample(model, budgets, classes, generator=torch.Generator().manual_seed(0))
    assert calls == [("forward", 3)] + [("step", 3)] * 31  # no guidance: no unconditional rows


@pytest.mark.parametrize("settings", [
    {"temperature": 1.0, "top_k": 10, "top_p": 0.9, "cfg_scale": 2.0},
    {"temperature": 0.8, "top_p": 0.7, "cfg_scale": Ramp(0.0, 3.0)},
    {"temperature": 1.0},
])
def test_same_tokens_with_and_without_the_cache_over_64_slots(settings: dict) -> None:
    """Fixed seeds, mixed budgets up to 64 slots, guidance and top-k/top-p filters: identical ids."""
    model = _model(tokens_per_iter=16, seed=2)
    budgets, classes = [64, 16, 48, 64], torch.tensor([0, 1, 2, -1])
    for seed in range(2):
        outs = [ARSampler(**settings, use_cache=c).sample(model, budgets, classes,
                                                           generator=torch.Generator().manual_seed(seed)).ids
                for c in (True, False)]
        assert torch.equal(outs[0], outs[1]), (settings, seed)


def test_same_tokens_and_budgets_with_generated_budgets() -> None:
    """The length model emits the budget from the cached class position; the ids follow through the steps."""
    model = _model(tokens_per_iter=16, seed=4, length_model=True)
    torch.nn.init.normal_(model.budget_head.weight, std=0.5)  # varied budgets, not uniform logits
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    outs = [ARSampler(cfg_scale=1.5, top_p=0.9, use_cache=c).sample(model, None, classes,
                                                                     generator=torch.Generator().manual_seed(3))
            for c in (True, False)]
    assert torch.equal(outs[0].lengths, outs[1].lengths) and len(set(outs[0].lengths.tolist())) > 1
    assert torch.equal(outs[0].ids, outs[1].ids)


@pytest.mark.slow
def test_same_tokens_at_the_bench_shape_256_slots() -> None:
    """The bench's public layout (32 tokens x 8 budgets = 256 slots, K=4096, W128 D3) with CFG and filters."""
    from bench.models import PRIOR_PUBLIC_LAYOUT
    from bench.models import build_prior as bench_prior

    model: AR = bench_prior("ar", "cpu", 0, **PRIOR_PUBLIC_LAYOUT)  # type: ignore[assignment]
    classes = torch.tensor([3, 7])
    for sampler in (ARSampler(temperature=1.0, top_k=600, top_p=0.95, cfg_scale=1.5), ARSampler()):
        outs = [ARSampler(**{**sampler.__dict__, "use_cache": c}).sample(
            model, 256, classes, generator=torch.Generator().manual_seed(0)).ids for c in (True, False)]
        assert torch.equal(outs[0], outs[1])
