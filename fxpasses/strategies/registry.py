"""The one registry of strategies every other module reads: registration, discovery of the
built-in strategies (the modules of `fxpasses.strategies` that define a module-level `STRATEGY`,
imported the first time the registry is read), lookup by name or alias, canonical order and
precedence. Config parsing, planning, pattern loading and the pipeline all read it; adding a
strategy is a new module (or a `register()` call from user code), never an edit here.
"""
from __future__ import annotations

import importlib
import pkgutil

from fxpasses.errors import ConfigError
from fxpasses.site_records import SITE_KINDS
from fxpasses.strategies.interface import GraphFamily, Strategy

_REGISTRY: dict[str, Strategy] = {}
_ALIASES: dict[str, str] = {}
_discovered = False


def _normal(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register(strategy: Strategy) -> Strategy:
    """Add a strategy (or replace one of the same name); returns it."""
    if not getattr(strategy, "name", ""):
        raise ConfigError(f"{strategy!r} has no name")
    if not isinstance(getattr(strategy, "family", None), GraphFamily):
        raise ConfigError(f"strategy {strategy.name}: set `family` to the GraphFamily it rewrites "
                          "(fxpasses.strategies.tp_family.TP_GRAPHS for tensor-parallel graphs)")
    bad = set(strategy.site_kinds) - set(SITE_KINDS)
    if bad:
        raise ConfigError(f"strategy {strategy.name}: unknown site kind(s) {sorted(bad)}; use {SITE_KINDS}")
    name = _normal(strategy.name)
    for alias in strategy.aliases:
        owner = _ALIASES.get(_normal(alias))
        if owner not in (None, name):
            raise ConfigError(f"strategy {name}: alias {alias!r} already names strategy {owner}")
    _REGISTRY[name] = strategy
    for alias in strategy.aliases:
        _ALIASES[_normal(alias)] = name
    return strategy


def unregister(name: str) -> None:
    name = _normal(name)
    _REGISTRY.pop(name, None)
    for a in [a for a, n in _ALIASES.items() if n == name]:
        del _ALIASES[a]


def _discover() -> None:
    """Import the modules of `fxpasses.strategies` once; each registers its `STRATEGY`."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    # deliberate lazy import: the package's modules are the plugins this registry discovers
    import fxpasses.strategies as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        s = getattr(mod, "STRATEGY", None)
        if isinstance(s, Strategy) and _normal(s.name) not in _REGISTRY:
            register(s)


def registered() -> list[Strategy]:
    """Every registered strategy in canonical order (ascending precedence, then name)."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda s: (s.precedence, s.name))


def registered_names() -> list[str]:
    return [s.name for s in registered()]


def get(name: str) -> Strategy:
    """The strategy called `name` (or one of its aliases); ConfigError listing the choices."""
    _discover()
    key = _normal(name)
    key = _ALIASES.get(key, key)
    s = _REGISTRY.get(key)
    if s is None:
        aliases = ", ".join(sorted(_ALIASES))
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(registered_names())} "
                          f"(aliases {aliases}), combined with '+'")
    return s


def canonical(names) -> tuple[str, ...]:
    """Resolve names and aliases, drop duplicates, order canonically."""
    chosen = {get(n).name for n in names}
    return tuple(s.name for s in registered() if s.name in chosen)


def by_precedence(kind: str, enabled) -> list[Strategy]:
    """The enabled strategies that may own a site of `kind`, highest precedence first."""
    return [s for s in reversed(registered()) if s.name in enabled and kind in s.site_kinds]
