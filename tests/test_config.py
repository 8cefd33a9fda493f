"""Typed configs: YAML + _base_ inheritance + dotted overrides; errors name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import pytest
import yaml

from tokenizer.core.config import ConfigError, from_dict, load_config, save_config, to_dict


class Mode(Enum):
    a = "a"
    b = "b"


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"inner.steps must be >= 1, got {self.steps}")


@dataclass
class Outer:
    name: str = "x"
    mode: Mode = Mode.a
    inner: Inner = field(default_factory=Inner)
    sizes: list[int] = field(default_factory=lambda: [1, 2])


def test_yaml_base_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("name: base\ninner:\n  lr: 0.5\n")
    (tmp_path / "exp.yaml").write_text("_base_: base.yaml\ninner:\n  steps: 20\nmode: b\n")
    cfg = load_config(Outer, tmp_path / "exp.yaml", ["inner.lr=0.25", "sizes=[3,4,5]"])
    assert cfg == Outer(name="base", mode=Mode.b, inner=Inner(lr=0.25, steps=20), sizes=[3, 4, 5])
    assert isinstance(cfg.inner, Inner)


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        ("inner:\n  lrr: 1\n", [], "inner.lrr"),
        ("", ["inner.steps=many"], "inner.steps"),
        ("", ["nope=1"], "nope"),
        ("mode: c\n", [], "mode"),
        ("", ["inner.steps=0"], "inner.steps must be >= 1"),
        ("", ["inner.lr"], "dotted.key=value"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, overrides: list[str], needle: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(Outer, p, overrides)


def test_missing_file_and_base_loop(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "absent.yaml")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(Outer, tmp_path / "a.yaml")


def test_roundtrip_and_saved_with_commit(tmp_path: Path) -> None:
    cfg = load_config(Outer, None, ["mode=b", "inner.steps=3"])
    assert from_dict(Outer, to_dict(cfg)) == cfg
    out = save_config(cfg, tmp_path / "run")
    body = yaml.safe_load(out.read_text())
    assert body["config"]["mode"] == "b" and body["config"]["inner"]["steps"] == 3
    assert body["git_commit"] and isinstance(body["git_commit"], str)


@dataclass
class WithFree:
    size: str = "tiny"
    overrides: dict[str, int] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


def test_free_form_dicts_take_new_keys_but_typed_nodes_do_not() -> None:
    cfg = load_config(WithFree, None, ["overrides.width=96", "overrides.depth=2"])
    assert cfg.overrides == {"width": 96, "depth": 2}
    with pytest.raises(ConfigError, match=r"inner\.nope"):
        load_config(WithFree, None, ["inner.nope=1"])


def test_required_keys_marked_in_the_file_must_be_given(tmp_path: Path) -> None:
    """`key: ???` in a YAML means "the command must set it": OmegaConf alone would keep the schema default
    (a forgotten data.source would silently train on the default dataset)."""
    (tmp_path / "gpu.yaml").write_text("name: ???\ninner:\n  lr: ???\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"inner\.lr, name must be given .*inner\.lr=\.\.\. name=\.\.\."):
        load_config(Outer, tmp_path / "gpu.yaml")
    with pytest.raises(ConfigError, match=r"name must be given"):
        load_config(Outer, tmp_path / "gpu.yaml", ["inner.lr=0.1"])
    cfg = load_config(Outer, tmp_path / "gpu.yaml", ["inner.lr=0.1", "name=run"])
    assert (cfg.name, cfg.inner.lr, cfg.inner.steps) == ("run", 0.1, 5)


# The run configs' model overrides (vq, alit, prior model) are checked against the model config.
def _run_config_error(config: str, overrides: list[str]) -> str:
    """The ConfigError message of loading a real run config (configs/...) with ``overrides``."""
    from generator.train import PriorRunConfig
    from tokenizer.train import TokenizerRunConfig

    schema = PriorRunConfig if "prior" in config else TokenizerRunConfig
    with pytest.raises(ConfigError) as err:
        load_config(schema, config, overrides)
    return str(err.value)


@pytest.mark.parametrize(
    ("config", "overrides", "needles"),
    [
        ("configs/tokenizer/distill_emoji_cpu.yaml", ["base=/b", "alit.wdith=64"],
         ["alit.wdith", "ALITConfig", "alit_size=small_cpu", "'width'", "spelling"]),
        ("configs/tokenizer/vq_emoji_cpu.yaml", ["vq.latent_chanels=8"],
         ["vq.latent_chanels", "BaseVQConfig", "vq_size=tiny", "'latent_channels'"]),
        ("configs/tokenizer/vq_emoji_cpu.yaml", ["vq_size=mage_tiny", "vq.n_embd=8"],
         ["vq.n_embd", "MageVQGANConfig", "'n_embed'"]),
        ("configs/prior/maskgit_emoji_cpu.yaml", ["tokens=/t", "model.dept=2"],
         ["model.dept", "MaskGITConfig", "kind=maskgit, size=tiny", "'depth'"]),
        ("configs/prior/ar_emoji_cpu.yaml", ["tokens=/t", "model.mask_schedule=cosine"],
         ["model.mask_schedule", "ARConfig"]),
        ("configs/tokenizer/vq_emoji_cpu.yaml", ["vq.resolution=32"], ["vq.resolution", "data.resolution"]),
        ("configs/prior/maskgit_emoji_cpu.yaml", ["tokens=/t", "model.codebook_size=8"],
         ["model.codebook_size", "token cache"]),
    ],
)
def test_misspelled_model_key_is_a_config_error(config: str, overrides: list[str], needles: list[str]) -> None:
    message = _run_config_error(config, overrides)
    assert all(needle in message for needle in needles), message


@pytest.mark.parametrize(
    ("config", "overrides", "needles"),
    [
        ("configs/tokenizer/vq_emoji_cpu.yaml", ["vq_size=tinny"], ["vq_size 'tinny'", "'mage_tiny'", "'tiny'"]),
        ("configs/tokenizer/distill_emoji_cpu.yaml", ["base=/b", "alit_size=smal"],
         ["alit_size 'smal'", "'small_cpu'"]),
        ("configs/prior/maskgit_emoji_cpu.yaml", ["tokens=/t", "size=ar_b"], ["'ar_b'", "'maskgit_b'"]),
        ("configs/prior/ar_emoji_cpu.yaml", ["tokens=/t", "size=maskgit_b"], ["'maskgit_b'", "'ar_b'"]),
    ],
)
def test_unknown_size_lists_the_choices(config: str, overrides: list[str], needles: list[str]) -> None:
    message = _run_config_error(config, overrides)
    assert all(needle in message for needle in needles), message


def test_valid_model_overrides_still_load() -> None:
    from generator.train import PriorRunConfig
    from tokenizer.train import TokenizerRunConfig

    cfg = load_config(TokenizerRunConfig, "configs/tokenizer/distill_emoji_cpu.yaml",
                      ["base=/b", "alit.width=128", "alit.decoder_depth=2"])
    assert cfg.alit == {"width": 128, "decoder_depth": 2}
    prior = load_config(PriorRunConfig, "configs/prior/maskgit_emoji_cpu.yaml", ["tokens=/t", "model.heads=2"])
    assert prior.model["heads"] == 2 and prior.model["width"] == 128
