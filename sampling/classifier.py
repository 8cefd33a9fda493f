"""The default classifier of the task token-count criterion: a small CNN trained on a dataset's classes.

Any callable ``images (B, 3, R, R) in [-1, 1] -> logits (B, C)`` is a classifier for
:func:`sampling.analysis.measure_tasks`; this module provides the default one, trained by
``alit analyze train-classifier`` on the embedded emoji set's 10 categories (never downloaded) and saved
as a model directory (``model.safetensors`` + ``config.json`` + ``manifest.json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizer.core.data import ImageDataset
from tokenizer.core.paths import alit_home
from tokenizer.core.pretrained import load_weights, read_model_meta, save_model_dir

MODEL_NAME = "TinyClassifier"
FORMAT_VERSION = 1


def default_classifier_dir() -> Path:
    """Where ``alit analyze train-classifier`` saves by default: ``$ALIT_HOME/models/classifier-emoji``."""
    return alit_home() / "models" / "classifier-emoji"


@dataclass
class ClassifierConfig:
    """A small CNN: three stride-2 3x3 convs (width, 2 width, 4 width), global mean pool, linear."""

    num_classes: int = 10
    resolution: int = 64
    width: int = 32
    class_names: list[str] = field(default_factory=list)


class TinyClassifier(nn.Module):
    """Images ``(B, 3, R, R)`` in [-1, 1] -> class logits ``(B, C)``."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = c = config
        w = c.width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.GELU())
        self.head = nn.Linear(4 * w, c.num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))

    def save_pretrained(self, path: str | Path, stats: dict[str, Any] | None = None) -> Path:
        """The one model-directory format (safetensors + JSON), with the training ``stats``."""
        return save_model_dir(path, MODEL_NAME, FORMAT_VERSION, asdict(self.config), self.state_dict(),
                              extra={"training": stats or {}})

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> TinyClassifier:
        meta = read_model_meta(path, MODEL_NAME, FORMAT_VERSION)
        model = cls(ClassifierConfig(**meta["config"]))
        load_weights(model, path, map_location)
        return model.to(map_location).eval().requires_grad_(False)


@torch.no_grad()
def predict(classifier: Any, images: Tensor, batch_size: int = 64) -> Tensor:
    """Argmax class of each image ``(B,)`` long (on the images' device)."""
    out = [classifier(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=images.device)


def _stack(dataset: ImageDataset) -> tuple[Tensor, Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def train_classifier(train: ImageDataset, val: ImageDataset, steps: int = 400, batch_size: int = 64,
                     lr: float = 2e-3, width: int = 32, seed: int = 0,
                     device: str | torch.device = "cpu") -> tuple[TinyClassifier, dict[str, Any]]:
    """AdamW on random batches of ``train`` (horizontal flips), seeded; returns the model (eval mode) and
    ``{steps, train_accuracy, val_accuracy, ...}``."""
    if train.num_classes < 2:
        raise ValueError(f"the classifier needs labelled data with >= 2 classes; {train.summary()} has "
                         f"{train.num_classes}: use a labelled source (e.g. the emoji set or class folders)")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"--steps ({steps}) and --batch-size ({batch_size}) must be >= 1")
    torch.manual_seed(seed)
    config = ClassifierConfig(train.num_classes, train.resolution, width, list(train.class_names))
    model = TinyClassifier(config).to(device)
    x_train, y_train = (t.to(device) for t in _stack(train))
    x_val, y_val = (t.to(device) for t in _stack(val))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (batch_size,), generator=g)
        x, y = x_train[idx.to(device)], y_train[idx.to(device)]
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    stats = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, final_loss=round(float(loss.detach()), 4),
                 train_images=len(x_train), val_images=len(x_val),
                 train_accuracy=round(float((predict(model, x_train) == y_train).float().mean()), 4),
                 val_accuracy=round(float((predict(model, x_val) == y_val).float().mean()), 4),
                 chance=round(float(np.bincount(y_val.cpu().numpy()).max() / max(1, len(y_val))), 4))
    return model, stats
