"""The search space: config keys and the distribution each trial draws its value from.

It comes from the config file's `sweep:` section, one config key per entry (nin-train skips that
section), in Optuna's terms:

    sweep:
      optim.lr: {type: float, low: 0.005, high: 0.2, log: true}   # log-uniform
      optim.weight_decay: {type: float, low: 0.0, high: 0.001}   # uniform (step: S for a grid)
      train.batch_size: {type: int, low: 64, high: 256, step: 64}
      model.batchnorm: {type: categorical, choices: [true, false]}  # or just [true, false]
      model.widths: ['32,96,192', '48,128,256']  # a list key: its values as text (choices are scalars)

Without the section the space is `default_space(cfg)`: the learning rate log-uniform from a tenth
to three times the config's `optim.lr`, weight decay uniform in [0, 1e-3], label smoothing uniform
in [0, 0.2]. Every entry is checked before any work, each problem one line naming `sweep.<key>`
(exit 2): an unknown key, a key nin-sweep sets itself (`run.*`, `tracking.*`), a key also fixed by
an override, an unknown type or field, an empty or reversed range; and every end of every range
(each choice) must be a value the config accepts for that key (`check_values`).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

from nin_dist.config import Config, all_keys, load_config
from nin_dist.errors import ConfigError
from nin_dist.typed_yaml import show

SECTION = "sweep"
RESERVED = ("run.", "tracking.")  # set by nin-sweep for each trial: its folder, name, parent, store
FIELDS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
          "categorical": {"type", "choices"}}


@dataclass(frozen=True)
class Distribution:
    """One key's distribution: `kind` float | int | categorical, with its range or its choices."""

    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial, key: str) -> Any:
        """The trial's value for `key` (Optuna's `suggest_*`)."""
        if self.kind == "float":
            return trial.suggest_float(key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(key, list(self.choices))

    def ends(self) -> list:
        """The values at the ends of the range, or every choice: each must be valid for the key."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> dict:
        """The distribution as the YAML gives it (stored with the study, shown on the parent run)."""
        if self.kind == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out = {"type": self.kind, "low": self.low, "high": self.high}
        return out | ({"log": True} if self.log else {}) | ({"step": self.step} if self.step is not None else {})


Space = dict[str, Distribution]


def as_override(key: str, value: Any) -> str:
    """`key=value` as nin-train reads it back to the same value (YAML spelling of bools and null)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, float):
        text = repr(value)  # the shortest text that reads back to the same float
    else:
        text = str(value)
    return f"{key}={text}"


def describe(space: Space) -> str:
    """The space as canonical JSON: what a study is checked against when it is taken up again."""
    return json.dumps({key: dist.describe() for key, dist in sorted(space.items())}, sort_keys=True)


def default_space(cfg: Config) -> Space:
    lr = cfg.optim.lr
    return {"optim.lr": Distribution("float", lr / 10, lr * 3, log=True),
            "optim.weight_decay": Distribution("float", 0.0, 1e-3),
            "optim.label_smoothing": Distribution("float", 0.0, 0.2)}


def _number(where: str, name: str, value, integer: bool) -> float | int:
    if isinstance(value, str) and not integer:  # YAML reads 1e-6 (no dot) as text, as nin-train's keys allow
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{where}: {name}={show(value)} is not allowed: {'an integer' if integer else 'a number'}")
    return value if integer else float(value)


def _distribution(where: str, spec) -> Distribution:
    """One entry of the section, checked; ConfigError naming `where` (`sweep.<key>`) otherwise."""
    if isinstance(spec, list):  # [a, b, c]: a categorical
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}={show(spec)} is not allowed: a distribution such as {{type: float, low: 0.01, "
                          f"high: 0.1, log: true}}, {{type: int, low: 1, high: 8}} or a list of choices")
    kind = spec.get("type")
    if kind not in FIELDS:
        raise ConfigError(f"{where}: type={show(kind)} is not allowed: float, int or categorical")
    unknown = sorted(str(name) for name in spec if name not in FIELDS[kind])
    if unknown:
        raise ConfigError(f"{where}: unknown field {show(unknown[0])} of a {kind} distribution; its fields: "
                          f"{', '.join(sorted(FIELDS[kind]))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not (isinstance(choices, list) and choices and all(
                c is None or isinstance(c, (bool, int, float, str)) for c in choices)):
            raise ConfigError(f"{where}: choices={show(choices)} is not allowed: a non-empty list of values "
                              f"(numbers, true/false, text or null)")
        if len({json.dumps(c) for c in choices}) < len(choices):
            raise ConfigError(f"{where}: choices={show(choices)} is not allowed: each choice once")
        return Distribution("categorical", choices=tuple(choices))
    integer = kind == "int"
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(f"{where}: a {kind} distribution needs low and high")
    low, high = (_number(where, name, spec[name], integer) for name in ("low", "high"))
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log={show(log)} is not allowed: true or false")
    if not low < high:
        raise ConfigError(f"{where}: low={show(low)}, high={show(high)} is not allowed: low below high")
    if log and low <= 0:
        raise ConfigError(f"{where}: low={show(low)} is not allowed with log: true (a positive low)")
    if step is not None:
        step = _number(where, "step", step, integer)
        if step <= 0 or log:
            raise ConfigError(f"{where}: step={show(step)} is not allowed: a positive step, without log: true")
    return Distribution(kind, low, high, log, step)


def parse_space(section, overrides: list[str]) -> Space:
    """The `sweep:` section as a Space; `overrides` are the command line's fixed `key=value` pairs."""
    if not isinstance(section, dict) or not section:
        raise ConfigError(f"{SECTION} must be a mapping of config keys to distributions (e.g. optim.lr: {{type: "
                          f"float, low: 0.01, high: 0.1, log: true}}), not {show(section)}")
    valid = all_keys()
    fixed = {item.partition("=")[0].strip() for item in overrides}
    space = {}
    for key, spec in section.items():
        where = f"{SECTION}.{key}"
        if not isinstance(key, str) or key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            raise ConfigError(f"{where}: unknown config key{f'; did you mean {close[0]}?' if close else ''}")
        if key.startswith(RESERVED):
            raise ConfigError(f"{where} is not allowed: nin-sweep sets run.* and tracking.* for each trial")
        if key in fixed:
            raise ConfigError(f"{where}: {key} is both searched and fixed by an override; drop one")
        space[key] = _distribution(where, spec)
    return space


def check_values(config_path, overrides: list[str], space: Space) -> None:
    """Every end of every range (every choice) makes a config nin-train accepts; else one line naming it."""
    for key, dist in space.items():
        for value in dist.ends():
            try:
                load_config(config_path, [*overrides, as_override(key, value)])
            except ConfigError as err:
                raise ConfigError(f"{SECTION}.{key} reaches {show(value)}, which the config refuses: {err}") from None
