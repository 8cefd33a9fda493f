"""FID evaluation throughput: Inception pool3 features per protocol, streaming statistics, the distance."""

from __future__ import annotations

import time

import numpy as np
import torch

from sampling.fid import FeatureExtractor, FeatureStats, FIDProtocol, fid_from_stats
from sampling.inception import TORCH_FIDELITY_NAME, FIDInceptionV3, build_network, resolve_inception
from tokenizer.core.weights import WeightsNotFound

from .models import emoji_uint8
from .report import Report
from .timing import Settings, measure

GROUP = "FID evaluation rate"


def bench_fid(settings: Settings, report: Report) -> None:
    """Images/s of feature extraction (both protocols, 64 px emoji, fp32 as the protocols require),
    of :class:`FeatureStats` updates, and the seconds of one 2048-d Frechet distance."""
    n = settings.pick(16, 1)
    images = emoji_uint8(n, settings.seed)
    for protocol in FIDProtocol:
        key = f"fid.features_per_s.{protocol.value}"
        try:
            extractor = FeatureExtractor(protocol, settings.torch_device, batch_size=n, progress=False)
        except WeightsNotFound as e:
            report.add(key, None, "img/s", GROUP, f"Inception pool3 features, {protocol.value} protocol",
                       note=f"FID weights not found: {str(e).splitlines()[0]}")
            continue
        if not settings.quick:
            extractor.extract(images[:1])  # build the network outside the timing
        tim = measure(lambda ex=extractor: ex.extract(images), settings)
        report.add(key, n / tim.median, "img/s", GROUP,
                   f"Inception pool3 features, {protocol.value} protocol ({n} images of 64 px, batch {n})",
                   timing=tim.to_json())
    _bench_layout(settings, report, images)
    dim = 2048
    feats = np.random.default_rng(settings.seed).standard_normal((settings.pick(512, 4), dim))
    tim = measure(lambda: FeatureStats(dim).update(feats), settings)
    report.add("fid.stats_per_s", len(feats) / tim.median, "img/s", GROUP,
               f"FeatureStats.update: float64 running sums of {dim}-d features (batch {len(feats)})",
               timing=tim.to_json())
    a = FeatureStats.from_features(feats)
    b = FeatureStats.from_features(feats[::-1] * 1.1 + 0.1)
    start = time.perf_counter()
    fid_from_stats(a, b)
    report.add("fid.frechet_s", time.perf_counter() - start, "s", GROUP,
               f"one Frechet distance between two {dim}-d statistics (pivoted Cholesky + eigvalsh, float64)")


def _bench_layout(settings: Settings, report: Report, images: np.ndarray) -> None:
    """``fid.channels_last_speedup``: the standard-layout Inception against the channels-last one that
    :func:`sampling.inception.place` gives on a CPU, same images and batch, same process."""
    key = "fid.channels_last_speedup"
    what = f"Inception pool3 on CPU: standard layout / channels-last ({len(images)} images of 64 px)"
    if settings.torch_device.type != "cpu":
        report.add(key, None, "x", GROUP, what, note="CPU only: place() keeps the standard layout on GPUs")
        return
    try:
        weights = resolve_inception(None).path
    except WeightsNotFound as e:
        report.add(key, None, "x", GROUP, what, note=f"FID weights not found: {str(e).splitlines()[0]}")
        return
    standard = FIDInceptionV3(TORCH_FIDELITY_NAME, ["2048"], feature_extractor_weights_path=weights)
    fast = build_network("cpu", weights)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (n, 3, 64, 64) uint8

    def run(net: FIDInceptionV3) -> torch.Tensor:
        with torch.inference_mode():
            return net(x)[0]

    base, cl = measure(lambda: run(standard), settings), measure(lambda: run(fast), settings)
    diff = (run(standard) - run(fast)).abs().max().item()
    report.add(key, base.median / cl.median, "x", GROUP, what, note=f"max |diff| of pool3 {diff:.1e}",
               timing=cl.to_json())
