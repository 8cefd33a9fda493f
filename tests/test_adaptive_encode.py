"""encode_adaptive against the straightforward way (all iterations, a pixel decode of every image at every
budget, then the rule), what it decodes, and the channels-last base decoders against the standard layout."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from bench.models import emoji_images
from bench.tokenizer_bench import adaptive_all_iterations, standard_layout
from tests.test_alit import _excite, _images
from tokenizer.alit import PAD_ID, ALITTokenizer
from tokenizer.vq import BaseVQ, base_vq_config
from tokenizer.vqgan import MageVQGAN, mage_vqgan_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _tok(base_kind: str, **alit: object) -> ALITTokenizer:
    torch.manual_seed(0)
    base = BaseVQ(base_vq_config("tiny")) if base_kind == "vq" else MageVQGAN(mage_vqgan_config("mage_tiny"))
    tok = ALITTokenizer.build(base.eval(), "tiny", **alit).eval()
    _excite(tok.alit)  # reconstructions that depend on the input and the budget (see tests/test_alit.py)
    return tok


@pytest.fixture(scope="module", params=["vq", pytest.param("mage", marks=pytest.mark.slow),
                                        pytest.param("vq_8x4", marks=pytest.mark.slow)])
def tok(request: pytest.FixtureRequest) -> ALITTokenizer:
    """ALIT tiny over either base kind, and a 4-token x 8-iteration layout (longer recurrences; slow)."""
    if request.param == "vq_8x4":
        return _tok("vq", num_iters=8, decoder_max_tokens=32)
    return _tok(request.param)


@contextmanager
def _count_pixel_rows(tok: ALITTokenizer) -> Iterator[list[int]]:
    """Patch ``tok.base.decode_codes`` to record the batch size of every pixel decode."""
    rows: list[int] = []
    original = tok.base.decode_codes

    def counting(codes: torch.Tensor) -> torch.Tensor:
        rows.append(codes.shape[0])
        return original(codes)

    tok.base.decode_codes = counting
    try:
        yield rows
    finally:
        del tok.base.decode_codes


def _thresholds(errs: torch.Tensor) -> list[float]:
    """0 (nothing settles), inf (everything settles at once) and thresholds halfway between distinct errors."""
    flat = errs.flatten().sort().values
    gaps = flat[1:] - flat[:-1]
    mids = ((flat[1:] + flat[:-1]) / 2)[gaps > 1e-4]
    return [0.0, math.inf, *mids[torch.linspace(0, len(mids) - 1, 5).long()].tolist()]


@pytest.mark.parametrize("inputs", ["random", "real"])
def test_encode_adaptive_equals_the_all_iterations_reference(tok: ALITTokenizer, inputs: str) -> None:
    """The same budgets and ids as all iterations + a pixel decode per iteration, at every threshold; an image
    is pixel-decoded only at budgets up to the one it settles at, and iterations stop once all have settled."""
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(5, 3, 64, 64, generator=g) * 2 - 1 if inputs == "random"
              else torch.cat([emoji_images(3, "cpu", 64, seed=2), _images(2)]))
    n, t_per = tok.config.num_iters, tok.tokens_per_iter
    _, _, errs = adaptive_all_iterations(tok, images, 0.0)  # (B, n)
    near = (errs[:, :, None] - errs[:, None, :]).abs() + torch.eye(n) * 1e9
    assert float(near.min()) > 1e-6, "near-tied errors: the argmin would rest on float rounding"
    settled_somewhere = 0
    for max_budget in (None, tok.budgets[n // 2 - 1]):
        m = n if max_budget is None else tok.alit.iterations_for(max_budget)
        for thr in _thresholds(errs[:, :m]):
            want_ids, want_lengths, _ = adaptive_all_iterations(tok, images, thr, max_budget)
            with _count_pixel_rows(tok) as rows:
                ids, lengths = tok.encode_adaptive(images, thr, max_budget)
            assert torch.equal(lengths, want_lengths), (thr, max_budget)
            assert torch.equal(ids, want_ids), (thr, max_budget)
            # the rule, recomputed from the reference's errors
            below = errs[:, :m] < thr
            first = torch.where(below.any(1), below.float().argmax(1), errs[:, :m].argmin(1))
            assert torch.equal(lengths, (first + 1) * t_per)
            # what was decoded: image i at iterations 0..s_i, s_i its settling iteration (m - 1 if never)
            settle = torch.where(below.any(1), below.float().argmax(1), torch.full_like(first, m - 1))
            assert sum(rows) == int((settle + 1).sum()), (rows, settle)
            assert len(rows) == tok.alit.last_encoder_iterations == tok.alit.last_decoder_passes \
                == int(settle.max()) + 1
            assert bool((ids[:, :int(lengths.min())] != PAD_ID).all())
            settled_somewhere += int(below.any(1).sum() > 0 and not bool(below[:, 0].all()))
    assert settled_somewhere > 0, "no threshold made some image settle after the first budget"


def test_worst_case_costs_one_encode_plus_the_decodes_it_needs(tok: ALITTokenizer) -> None:
    """Nothing settles (threshold 0): num_iters encoder iterations and decoder passes (encode at the largest
    budget runs the same iterations and all but the last pass), and one pixel decode of every image at every
    budget, each iteration's images batched into one decode."""
    images = _images(3)
    with _count_pixel_rows(tok) as rows:
        tok.encode_adaptive(images, 0.0)
    n = tok.config.num_iters
    assert rows == [3] * n
    assert tok.alit.last_encoder_iterations == n == tok.alit.last_decoder_passes
    tok.encode(images, tok.max_budget)
    assert tok.alit.last_encoder_iterations == n and tok.alit.last_decoder_passes == n - 1


# ============================================================================ channels-last base decoders
@pytest.mark.parametrize("base", [lambda: BaseVQ(base_vq_config("tiny")),
                                  pytest.param(lambda: BaseVQ(base_vq_config("small")), marks=pytest.mark.slow),
                                  lambda: MageVQGAN(mage_vqgan_config("mage_tiny"))], ids=["tiny", "small", "mage"])
def test_channels_last_decoder_equals_standard_layout(base, tmp_path) -> None:
    """Channels-last weights and activations give the standard layout's images and gradients up to float
    rounding; saved weights are contiguous and a loaded model runs channels-last again."""
    torch.manual_seed(0)
    model = base().eval()
    decoder = getattr(model, "vq", model).decoder
    assert decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    std = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert not getattr(std, "vq", std).decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    g, c = model.grid_size, model.code_dim
    codes = torch.randn(2, g * g, c).transpose(1, 2).reshape(2, c, g, g)  # as soft_codes lays them out
    with torch.no_grad():
        for x in (codes, codes.contiguous()):
            out, ref = model.decode_codes(x), std.decode_codes(x.contiguous())
            assert out.is_contiguous() and out.shape == ref.shape
            torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)
    # training: the same gradients through the decoder
    x = codes.clone().requires_grad_(True)
    model.decode_codes(x).square().mean().backward()
    x_std = codes.clone().requires_grad_(True)
    std.decode_codes(x_std).square().mean().backward()
    torch.testing.assert_close(x.grad, x_std.grad, atol=1e-5 * float(x_std.grad.abs().max()), rtol=1e-4)
    w, w_std = decoder.conv_out.weight.grad, getattr(std, "vq", std).decoder.conv_out.weight.grad
    torch.testing.assert_close(w, w_std, atol=1e-5 * float(w_std.abs().max()), rtol=1e-4)
    model.save_pretrained(tmp_path / "m")
    loaded = type(model).from_pretrained(tmp_path / "m")
    assert getattr(loaded, "vq", loaded).decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(loaded.decode_codes(codes), model.decode_codes(codes))


def test_standard_layout_copy_for_the_bench() -> None:
    """The bench's public-way baseline decodes in the standard layout, to the same images."""
    tok = _tok("vq")
    std = standard_layout(tok)
    assert not std.base.vq.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert tok.base.vq.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    images = _images(2)
    ids = tok.encode(images, 8)
    torch.testing.assert_close(std.decode(ids), tok.decode(ids), atol=1e-5, rtol=1e-5)
