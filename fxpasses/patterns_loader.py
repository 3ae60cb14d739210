"""Declarative pattern sets: load, validate and merge them; answer "which strategy may own this prefix".

Shipped sets live in the package data `fxpasses.patterns` (top-level folder `patterns/` in the
repository); a user's file (TOML or JSON, same keys) can be named instead. Errors name the file,
the key and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fxpasses.errors import PatternError
from fxpasses.strategies import registry as strategy_registry
from fxpasses.site_records import SITE_KINDS

_STRATEGY_FIELDS = ("row", "column", "embedding", "moe", "reduce", "exclude")


@dataclass
class StrategyPatterns:
    row: list[str] = field(default_factory=list)
    column: list[str] = field(default_factory=list)
    embedding: list[str] = field(default_factory=list)
    moe: list[str] = field(default_factory=list)
    reduce: list[str] = field(default_factory=list)   # all-reduces outside any layer (see sites)
    exclude: list[str] = field(default_factory=list)

    def matches(self, kind: str, prefix: str) -> bool:
        pats = getattr(self, kind, []) if kind in _STRATEGY_FIELDS else []
        return any(p == "*" or p in prefix for p in pats)

    def excluded(self, prefix: str) -> str | None:
        return next((p for p in self.exclude if p in prefix), None)


@dataclass
class PatternSet:
    name: str
    sources: list[str]
    classes: dict[str, list[str]]
    exclude: list[str]
    strategies: dict[str, StrategyPatterns]
    overrides: dict[str, list[str]] = field(default_factory=dict)  # kind -> prefix substrings

    def kind_of(self, class_names: list[str], prefix: str = "") -> str | None:
        """Site kind for a layer whose class (first) and base classes are `class_names`; an
        `[overrides]` entry matching `prefix` re-classifies a layer that is a site by class."""
        for cname in class_names:
            for kind in SITE_KINDS:
                if cname in self.classes.get(kind, ()):
                    return next((k for k, pats in self.overrides.items()
                                 if any(p in prefix for p in pats)), kind)
        return None

    def excluded(self, prefix: str) -> str | None:
        return next((p for p in self.exclude if p in prefix), None)

    def for_strategy(self, strategy) -> StrategyPatterns:
        """The strategy's table in this set, else the strategy's own `default_patterns`."""
        sp = self.strategies.get(strategy.name)
        if sp is not None:
            return sp
        return StrategyPatterns(**{k: list(v) for k, v in strategy.default_patterns.items()})

    def fingerprint(self) -> str:
        return json.dumps({"classes": self.classes, "exclude": self.exclude, "overrides": self.overrides,
                           "strategies": {k: vars(v) for k, v in self.strategies.items()}}, sort_keys=True)


def _str_list(v: Any, where: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise PatternError(f"{where} must be a list of non-empty strings, got {v!r}")
    return list(v)


def parse_pattern_dict(d: dict[str, Any], source: str) -> PatternSet:
    strategy_keys = strategy_registry.registered_names()
    allowed = {"name", "description", "classes", "overrides", "exclude", *strategy_keys}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise PatternError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    classes: dict[str, list[str]] = {}
    for k, v in (d.get("classes") or {}).items():
        if k not in SITE_KINDS:
            raise PatternError(f"{source}: classes.{k} is not a site kind; use one of {SITE_KINDS}")
        classes[k] = _str_list(v, f"{source}: classes.{k}")
    overrides: dict[str, list[str]] = {}
    for k, v in (d.get("overrides") or {}).items():
        if k not in SITE_KINDS:
            raise PatternError(f"{source}: overrides.{k} is not a site kind; use one of {SITE_KINDS}")
        overrides[k] = _str_list(v, f"{source}: overrides.{k}")
    ex = d.get("exclude") or {}
    if not isinstance(ex, dict) or set(ex) - {"prefixes"}:
        raise PatternError(f"{source}: exclude must be a table with one key 'prefixes'")
    exclude = _str_list(ex.get("prefixes", []), f"{source}: exclude.prefixes")
    strategies = {}
    for s in strategy_keys:
        if s not in d:
            continue
        t = d[s]
        if not isinstance(t, dict):
            raise PatternError(f"{source}: [{s}] must be a table")
        bad = sorted(set(t) - set(_STRATEGY_FIELDS))
        if bad:
            raise PatternError(f"{source}: [{s}] has unknown key(s) {bad}; allowed: {list(_STRATEGY_FIELDS)}")
        strategies[s] = StrategyPatterns(**{k: _str_list(v, f"{source}: {s}.{k}") if v else []
                                            for k, v in t.items()})
    return PatternSet(name=str(d.get("name", source)), sources=[source], classes=classes,
                      exclude=exclude, strategies=strategies, overrides=overrides)


def builtin_dir() -> Path:
    """Where the shipped sets are: `fxpasses/patterns/` in an installed wheel, the repository's
    top-level `patterns/` in a source checkout or editable install."""
    pkg = Path(str(resources.files("fxpasses")))
    for cand in (pkg / "patterns", pkg.parent / "patterns"):
        if (cand / "default.toml").is_file():
            return cand
    raise PatternError(f"built-in pattern sets not found next to {pkg}; reinstall fxpasses")


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def _read(spec: str) -> tuple[dict[str, Any], str]:
    path = Path(spec)
    if path.suffix in (".toml", ".json") or path.exists():
        if not path.is_file():
            raise PatternError(f"pattern file {spec} does not exist; give a path to a .toml/.json file "
                               f"or a built-in set name ({', '.join(builtin_names())})")
        text, source = path.read_text(), str(path)
    else:
        res = builtin_dir() / f"{spec}.toml"
        if not res.is_file():
            raise PatternError(f"no built-in pattern set named {spec!r}; built-in sets: "
                               f"{', '.join(builtin_names())}, or give a file path")
        text, source = res.read_text(), f"builtin:{spec}"
        path = Path(f"{spec}.toml")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import tomllib
            data = tomllib.loads(text)
    except Exception as e:  # tomllib.TOMLDecodeError / json.JSONDecodeError
        raise PatternError(f"{source}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise PatternError(f"{source}: top level must be a table/object")
    return data, source


def load_patterns(specs: tuple[str, ...] | list[str] | str = ("default",)) -> PatternSet:
    """Load and merge pattern sets (later sets extend earlier ones)."""
    if isinstance(specs, str):
        specs = (specs,)
    if not specs:
        raise PatternError("no pattern set given; use 'default' or a file path")
    merged: PatternSet | None = None
    for spec in specs:
        ps = parse_pattern_dict(*_read(spec))
        if merged is None:
            merged = ps
            continue
        merged.sources += ps.sources
        for k, v in ps.classes.items():
            merged.classes.setdefault(k, [])
            merged.classes[k] += [x for x in v if x not in merged.classes[k]]
        merged.exclude += [x for x in ps.exclude if x not in merged.exclude]
        for k, v in ps.overrides.items():
            merged.overrides.setdefault(k, [])
            merged.overrides[k] += [x for x in v if x not in merged.overrides[k]]
        for s, sp in ps.strategies.items():
            cur = merged.strategies.setdefault(s, StrategyPatterns())
            for f in _STRATEGY_FIELDS:
                getattr(cur, f).extend(x for x in getattr(sp, f) if x not in getattr(cur, f))
    assert merged is not None
    if not merged.classes:
        raise PatternError(f"{', '.join(merged.sources)}: no [classes] table; without it no layer is a site")
    return merged
