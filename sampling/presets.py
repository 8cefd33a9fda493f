"""Sampler settings in one table, and the sampling presets a prior directory holds (``sampling.json``).

Every setting the samplers take is one :class:`Knob` of :data:`KNOBS`: its field name (in
:class:`~sampling.generate.SampleSettings` and :class:`~sampling.report.EvalSettings`), default, range,
the prior kinds that use it, its command-line flag and its short name in sweeps. The command line
(:func:`add_sampler_arguments`), presets and sweeps all read and check values through this table.

============================  ==========  =======================================================
setting (flag)                 priors      meaning
============================  ==========  =======================================================
``cfg_scale`` (``--cfg``)      both        guidance ``cond + s (cond - uncond)``; 0 = none
``cfg_schedule``               both        how the scale runs over the steps (AR: the slots)
``temperature``                both        candidate sampling temperature (0 = argmax)
``temperature_schedule``       maskgit     how the temperature runs over the steps
``choice_temperature``         maskgit     Gumbel noise on the confidence that keeps slots masked
``choice_schedule``            maskgit     how the choice temperature runs (default: down to 0)
``steps``                      maskgit     parallel decoding steps
``mask_schedule``              maskgit     fraction still masked after each step: cosine, arccos, linear
``top_k``, ``top_p``           ar          keep the k most likely ids / the nucleus of mass p
============================  ==========  =======================================================

A value schedule is named: ``constant`` (the value at every step), ``linear`` (0 at the first step up to the
value at the last), ``linear-down`` (the value at the first step down to 0 at the last); see
:func:`value_schedule`.

**sampling.json** (format ``alit-sampling/1``), beside the prior's weights; ``default`` applies to every
budget, ``budgets`` per budget (``"8"``, ``"adaptive"``), ``notes`` records where a value came from
(``alit eval --sweep ... --save-best`` writes it)::

    {"format": "alit-sampling/1",
     "default": {"cfg_scale": 1.5, "steps": 12},
     "budgets": {"8": {"cfg_scale": 2.0, "cfg_schedule": "linear"}},
     "notes": {"8": {"sweep": "...", "gfid": 41.2}}}

**Precedence** (:func:`resolve`): the samplers' defaults < ``default`` < ``budgets[b]`` < the command line.
The file is not part of the prior's identity (:func:`tokenizer.core.checkpoint.tokenizer_identity` skips it):
changing how a prior is sampled does not change the prior.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from generator.maskgit import MASK_SCHEDULES
from tokenizer.core.checkpoint import SAMPLING_PRESET
from tokenizer.core.errors import UsageError
from tokenizer.core.io import atomic_write_text

from .schedules import Ramp, ValueSchedule

PRESET_FILE = SAMPLING_PRESET  # in a prior directory, outside its identity
PRESET_FORMAT = "alit-sampling/1"
VALUE_SCHEDULES = ("constant", "linear", "linear-down")
MASKGIT, AR = "maskgit", "ar"
BOTH = (MASKGIT, AR)
_PRESET_KEYS = ("format", "default", "budgets", "notes")


@dataclass(frozen=True)
class Knob:
    """One sampler setting: what it is called, its type, default and range, and which priors use it."""

    name: str  # field name (SampleSettings, EvalSettings, sampling.json)
    type: type  # float, int or str
    default: Any
    kinds: tuple[str, ...]  # prior kinds whose sampler uses it
    help: str
    short: str = ""  # sweep / flag name when it differs from the field name ("cfg")
    choices: tuple[str, ...] = ()  # for str settings
    low: float | None = None  # smallest value allowed (inclusive unless low_open)
    low_open: bool = False
    high: float | None = None  # largest value allowed (inclusive)

    @property
    def flag(self) -> str:
        return "--" + (self.short or self.name).replace("_", "-")

    @property
    def names(self) -> tuple[str, ...]:
        """Every spelling accepted for this setting (field name, short name, with - or _)."""
        spellings = {self.name, self.name.replace("_", "-")}
        if self.short:
            spellings |= {self.short, self.short.replace("_", "-")}
        return tuple(sorted(spellings))

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        low = "" if self.low is None else (f"> {self.low:g}" if self.low_open else f">= {self.low:g}")
        high = "" if self.high is None else f"<= {self.high:g}"
        kind = "an integer" if self.type is int else "a number"
        return f"{kind} {' and '.join(p for p in (low, high) if p)}".strip()


KNOBS: tuple[Knob, ...] = (
    Knob("cfg_scale", float, 0.0, BOTH, "guidance scale: cond + s (cond - uncond); 0 = none", short="cfg", low=0),
    Knob("cfg_schedule", str, "constant", BOTH, "how the guidance scale runs over the decoding steps (AR: slots): "
         "constant, linear (0 up to the scale), linear-down (the scale down to 0)", choices=VALUE_SCHEDULES),
    Knob("temperature", float, 1.0, BOTH, "sampling temperature (0 = argmax)", low=0),
    Knob("temperature_schedule", str, "constant", (MASKGIT,), "MaskGIT: how the temperature runs over the steps",
         choices=VALUE_SCHEDULES),
    Knob("choice_temperature", float, 4.5, (MASKGIT,), "MaskGIT: Gumbel noise on the confidence that decides which "
         "slots stay masked", low=0),
    Knob("choice_schedule", str, "linear-down", (MASKGIT,), "MaskGIT: how the choice temperature runs over the "
         "steps (linear-down: to 0 at the last step)", choices=VALUE_SCHEDULES),
    Knob("steps", int, 8, (MASKGIT,), "MaskGIT decoding steps", low=1),
    Knob("mask_schedule", str, "cosine", (MASKGIT,), "MaskGIT: fraction of slots still masked after each step",
         choices=tuple(MASK_SCHEDULES)),
    Knob("top_k", int, 0, (AR,), "AR: keep the k most likely ids (0 = all)", low=0),
    Knob("top_p", float, 1.0, (AR,), "AR: nucleus mass (1 = all)", low=0, low_open=True, high=1),
)
BY_NAME: dict[str, Knob] = {k.name: k for k in KNOBS}
DEFAULTS: dict[str, Any] = {k.name: k.default for k in KNOBS}
_SPELLINGS: dict[str, str] = {s: k.name for k in KNOBS for s in k.names}


# ============================================================================ one setting
def canonical(key: str, where: str = "setting") -> str:
    """The field name of a setting spelled ``key`` (``cfg`` -> ``cfg_scale``); an unknown one is a UsageError."""
    name = _SPELLINGS.get(key.strip().lower())
    if name is None:
        raise UsageError(f"{where} {key!r} is not a sampler setting: use one of "
                         f"{', '.join(k.short or k.name for k in KNOBS)}")
    return name


def parse_value(name: str, value: Any, where: str = "") -> Any:
    """``value`` (text from a command line, or a JSON/YAML value) as setting ``name``'s type, range-checked."""
    knob = BY_NAME[name]
    label = where or knob.short or knob.name
    text = value.strip() if isinstance(value, str) else value
    try:
        if knob.type is str:
            if not isinstance(text, str):
                raise ValueError
            out: Any = text.lower()
        elif isinstance(text, bool):
            raise ValueError
        elif knob.type is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError
            out = int(number)
        else:
            out = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{label}={value!r} is not valid: use {knob.range_text()}") from None
    problem = out_of_range(name, out)
    if problem:
        raise UsageError(f"{label}={value!r} is out of range: use {problem}")
    return out


def out_of_range(name: str, value: Any) -> str | None:
    """What setting ``name`` allows when ``value`` is outside it, else None."""
    knob = BY_NAME[name]
    if knob.choices:
        return None if value in knob.choices else knob.range_text()
    if isinstance(value, float) and not math.isfinite(value):
        return knob.range_text()
    if knob.low is not None and (value < knob.low or (knob.low_open and value == knob.low)):
        return knob.range_text()
    if knob.high is not None and value > knob.high:
        return knob.range_text()
    return None


def check_settings(values: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first setting whose value is out of range."""
    for name, value in values.items():
        problem = out_of_range(name, value)
        if problem:
            raise ValueError(f"{name}={value!r} is out of range: use {problem}")


def names_for(kind: str) -> tuple[str, ...]:
    """The settings the sampler of prior kind ``kind`` uses."""
    return tuple(k.name for k in KNOBS if kind in k.kinds)


def unsupported(names: Iterable[str], kind: str) -> list[str]:
    """The settings among ``names`` that the sampler of ``kind`` does not use."""
    return [n for n in names if kind not in BY_NAME[n].kinds]


def kind_problem(names: Iterable[str], kind: str, where: str) -> str | None:
    """``"top_k (--top-k) applies to ar priors only; ... is a maskgit prior"``, or None."""
    bad = unsupported(names, kind)
    if not bad:
        return None
    what = ", ".join(f"{n} ({BY_NAME[n].flag})" for n in bad)
    kinds = sorted({k for n in bad for k in BY_NAME[n].kinds})
    return (f"{what} in {where} only applies to {'/'.join(kinds)} priors, and this is a {kind} prior: "
            f"its settings are {', '.join(names_for(kind))}")


def non_default(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``values`` that differ from the samplers' defaults."""
    return {k: v for k, v in values.items() if k in DEFAULTS and v != DEFAULTS[k]}


def value_schedule(name: str, value: float) -> float | ValueSchedule:
    """``value`` over the decoding steps under schedule ``name`` (``t`` = 0 at the first step, 1 at the last):
    ``constant`` -> the value, ``linear`` -> Ramp(0, value), ``linear-down`` -> Ramp(value, 0)."""
    if name == "constant":
        return float(value)
    if name == "linear":
        return Ramp(0.0, float(value))
    if name == "linear-down":
        return Ramp(float(value), 0.0)
    raise ValueError(f"unknown value schedule {name!r}: use one of {', '.join(VALUE_SCHEDULES)}")


# ============================================================================ sampling.json
@dataclass(frozen=True)
class Preset:
    """The settings a prior should be sampled with: ``default`` for every budget, ``budgets`` per budget."""

    default: dict[str, Any] = field(default_factory=dict)
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)  # "8" / "adaptive" -> settings
    notes: dict[str, Any] = field(default_factory=dict)  # where values came from (free-form per budget)
    path: Path | None = None  # the file it was read from

    def to_json(self) -> dict[str, Any]:
        return {"format": PRESET_FORMAT, "default": dict(sorted(self.default.items())),
                "budgets": {b: dict(sorted(v.items())) for b, v in sorted(self.budgets.items(), key=_budget_order)},
                "notes": self.notes}

    def names(self) -> set[str]:
        """Every setting the preset sets somewhere."""
        return set(self.default) | {n for v in self.budgets.values() for n in v}


def _budget_order(item: tuple[str, Any]) -> tuple[bool, int]:
    return (not item[0].isdigit(), int(item[0]) if item[0].isdigit() else 0)


def preset_path(prior_dir: str | Path) -> Path:
    """Where a prior's preset lives."""
    return Path(prior_dir) / PRESET_FILE


def _settings_of(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise UsageError(f"{where} must be an object of sampler settings, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        name = canonical(str(key), f"{where}:")
        out[name] = parse_value(name, value, f"{where}.{key}")
    return out


def load_preset(path: str | Path, kind: str | None = None, budgets: Iterable[int] | None = None) -> Preset:
    """Read and check a ``sampling.json``: settings known and in range, used by prior kind ``kind`` (when
    given), budget keys among ``budgets`` or ``adaptive`` (when given). Any problem is one UsageError line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"sampling preset {path} does not exist: pass an existing file or --no-preset") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"sampling preset {path} is not readable JSON ({e}): fix or delete it") from None
    if not isinstance(data, dict) or set(data) - set(_PRESET_KEYS):
        extra = sorted(set(data) - set(_PRESET_KEYS)) if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"sampling preset {path}: unexpected {extra}; it holds {', '.join(_PRESET_KEYS)} "
                         "(see sampling.presets)")
    if data.get("format", PRESET_FORMAT) != PRESET_FORMAT:
        raise UsageError(f"sampling preset {path} has format {data['format']!r}, not {PRESET_FORMAT!r}")
    default = _settings_of(data.get("default", {}), f"{path.name} default")
    per_budget: dict[str, dict[str, Any]] = {}
    raw = data.get("budgets", {})
    if not isinstance(raw, dict):
        raise UsageError(f"sampling preset {path}: budgets must map a budget ('8', 'adaptive') to settings")
    valid = None if budgets is None else [int(b) for b in budgets]
    for key, obj in raw.items():
        b = str(key).strip().lower()
        if not (b == "adaptive" or (b.isdigit() and (valid is None or int(b) in valid))):
            raise UsageError(f"sampling preset {path}: budget {key!r} is not one of the prior's budgets "
                             f"{valid if valid is not None else ''} or 'adaptive'")
        per_budget[str(int(b)) if b.isdigit() else b] = _settings_of(obj, f"{path.name} budgets.{key}")
    preset = Preset(default, per_budget, data.get("notes", {}) or {}, path)
    if kind is not None:
        problem = kind_problem(sorted(preset.names()), kind, str(path))
        if problem:
            raise UsageError(problem)
    return preset


def find_preset(prior_dir: str | Path | None, explicit: str | Path | None = None, disabled: bool = False,
                kind: str | None = None, budgets: Iterable[int] | None = None) -> Preset:
    """The preset a command uses: ``explicit`` (``--preset``), else the prior's ``sampling.json`` when it
    exists; an empty one with ``disabled`` (``--no-preset``) or when there is none."""
    if disabled:
        return Preset()
    if explicit is not None:
        return load_preset(explicit, kind, budgets)
    if prior_dir is not None and preset_path(prior_dir).is_file():
        return load_preset(preset_path(prior_dir), kind, budgets)
    return Preset()


def write_preset(path: str | Path, preset: Preset) -> Path:
    """Write ``preset`` atomically as JSON."""
    path = Path(path)
    atomic_write_text(path, json.dumps(preset.to_json(), indent=1) + "\n")
    return path


def save_best(prior_dir: str | Path, best: Mapping[str, Mapping[str, Any]],
              notes: Mapping[str, Any]) -> Path:
    """Write ``best`` (budget key -> settings) into the prior's ``sampling.json`` as per-budget entries,
    keeping its ``default`` and the other budgets; ``notes[budget]`` records where each came from."""
    path = preset_path(prior_dir)
    old = load_preset(path) if path.is_file() else Preset()
    budgets = {**old.budgets, **{str(b): dict(v) for b, v in best.items()}}
    merged_notes = {**old.notes, **{str(b): n for b, n in notes.items()}}
    return write_preset(path, Preset(dict(old.default), budgets, merged_notes))


# ============================================================================ precedence
def resolve(preset: Preset, explicit: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(base, per_budget)``: base = defaults < ``preset.default`` < ``explicit``; per_budget[b] = the
    preset's entries for budget ``b`` that the command line does not override (they apply on top of base)."""
    base = {**DEFAULTS, **preset.default, **explicit}
    per_budget = {b: {k: v for k, v in s.items() if k not in explicit} for b, s in preset.budgets.items()}
    return base, {b: s for b, s in per_budget.items() if s}


def for_budget(base: Mapping[str, Any], per_budget: Mapping[str, Mapping[str, Any]], budget: int | str
               ) -> dict[str, Any]:
    """The settings of ``budget``: ``base`` with its per-budget entries on top."""
    return {**base, **per_budget.get(str(budget), {})}


# ============================================================================ command line
def add_sampler_arguments(parser: argparse.ArgumentParser, what: str = "") -> None:
    """A flag per setting (default None: unset, so the preset or the sampler default applies) and
    ``--preset FILE`` / ``--no-preset``."""
    group = parser.add_argument_group(f"sampler settings{what} (defaults < the prior's sampling.json < these flags)")
    for knob in KNOBS:
        kwargs: dict[str, Any] = {"choices": knob.choices} if knob.choices else {"metavar": knob.type.__name__.upper()}
        group.add_argument(knob.flag, dest=knob.name, type=knob.type if not knob.choices else str.lower,
                           default=None, help=f"{knob.help} (default {knob.default})", **kwargs)
    group.add_argument("--preset", default=None,
                       help=f"sampling settings file (default: <prior>/{PRESET_FILE} when it exists)")
    group.add_argument("--no-preset", action="store_true", help=f"ignore the prior's {PRESET_FILE}")


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, range-checked (a UsageError names the flag)."""
    out = {}
    for knob in KNOBS:
        value = getattr(args, knob.name, None)
        if value is not None:
            out[knob.name] = parse_value(knob.name, value, knob.flag)
    return out


def command_settings(args: argparse.Namespace, prior_dir: str | Path | None, kind: str,
                     budgets: Iterable[int]) -> tuple[dict[str, Any], dict[str, dict[str, Any]], Preset]:
    """What ``alit sample`` / ``alit eval`` sample with: ``(base, per_budget, preset)`` from the flags, the
    preset and the defaults; flags for settings the prior kind does not use are refused."""
    explicit = explicit_settings(args)
    problem = kind_problem(explicit, kind, "the command line")
    if problem:
        raise UsageError(problem)
    budgets = list(budgets)
    preset = find_preset(prior_dir, args.preset, args.no_preset, kind, budgets)
    base, per_budget = resolve(preset, explicit)
    return base, per_budget, preset
