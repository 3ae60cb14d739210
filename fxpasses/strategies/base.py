"""The strategy interface and the one registry every other module reads.

A strategy is one `Strategy` subclass instance, registered with `register()`. It says

* its `name` and `aliases` (config spellings),
* which graphs it rewrites (`family`: `TP_GRAPHS`, vanilla tensor-parallel graphs, or the
  DP-attention graphs of `fxpasses.strategies.dp_common`; strategies of different families cannot
  be combined),
* the site kinds it may own and its `precedence` (when several enabled strategies want the same
  site, the highest precedence owns it; config order is ascending precedence),
* the prefixes it owns when the pattern set has no table for it (`default_patterns`),
* `validate(config, tp, world)`: ConfigError for sizes it cannot run with,
* `prepare_groups(config, ctx, create)`: the process groups beyond TP it needs (`fxpasses.topology`):
  created outside compilation (`create=True`), only looked up inside it,
* `precheck(plan, rw, ctx)`: the reason one planned site cannot be rewritten, or None,
* `rewrite(rw, plans, ctx)`: rewrite the sites it owns with the LayoutRewriter's primitives and mark
  each plan rewritten or skipped with the reason; `after_propagation` may correct plans whose
  outcome the propagation walk decides.

Built-in strategies are the modules of `fxpasses.strategies` that define a module-level `STRATEGY`;
they are discovered (imported and registered) the first time the registry is read. Adding a strategy
is a new module (or a `register()` call from user code); config parsing, planning, pattern loading
and the pipeline all read this registry.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, ClassVar

from fxpasses.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - types only
    from fxpasses.config import FxPassesConfig
    from fxpasses.context import GroupRef, TPContext
    from fxpasses.plan import SitePlan
    from fxpasses.rewriter import LayoutRewriter

# "reduce": an all-reduce outside any layer (the end of an MoE block or a parallel-residual layer)
SITE_KINDS = ("row", "column", "embedding", "replicated", "moe", "reduce")
# kinds whose weights vLLM shards over the TP group: their outputs are rank-local (feature shards or
# partial sums) until an all-reduce, whatever strategy owns them (see `fxpasses.rewriter`)
TP_SHARDED_KINDS = ("row", "column", "embedding", "moe")


class GraphFamily:
    """What kind of original graph a strategy rewrites, and what the pipeline needs to know of it:
    whether the rank can rewrite at all, the token count and the group the LayoutRewriter pads over."""

    name: ClassVar[str] = ""
    # the pipeline keeps a rewrite only if it sends no more bytes per step than the original graph
    bounded_by_original_bytes: ClassVar[bool] = True

    def validate(self, config: "FxPassesConfig", tp: int, world: int) -> None:
        """Raise ConfigError when graphs of this family cannot be rewritten at this tp / world."""

    def nothing_to_do(self, ctx: "TPContext") -> str | None:
        """Why this rank has nothing to rewrite in such a graph, or None."""
        raise NotImplementedError

    def token_count(self, plans: list["SitePlan"]):
        """T (int or SymInt) read from the owned sites, or None."""
        raise NotImplementedError

    def rewriter_group(self, ctx: "TPContext", config: "FxPassesConfig") -> tuple["GroupRef", int]:
        """(group, this rank's index in it) the LayoutRewriter pads and shards over."""
        raise NotImplementedError

    def rank_local_values(self, plans: list["SitePlan"]) -> list:
        """Nodes whose values depend on a weight sharded over the rewriter's group."""
        return []

    def __repr__(self) -> str:
        return f"<graph family {self.name}>"


class _TPGraphs(GraphFamily):
    """Vanilla tensor-parallel graphs: row layers end in a TP all-reduce of [T, ...] values."""

    name = "tp"

    def validate(self, config, tp, world):
        if tp <= 1:
            raise ConfigError(f"{'+'.join(config.strategies)} needs tensor parallelism, but tp={tp}; "
                              "run with tensor_parallel_size >= 2 or disable the strategy")

    def nothing_to_do(self, ctx):
        if ctx.tp < 2 or ctx.tp_group is None:
            return f"tp={ctx.tp}: nothing to rewrite"
        return None

    def token_count(self, plans):
        """The graph's token count T, read from the graph rather than assumed at dim 0: the size
        of the token ids entering the embedding ([T], or [1, T] for Transformers-backend models),
        else the first symbolic size (or dim 0) of the first owned all-reduced tensor."""
        import torch

        from fxpasses import graph_forms as gf

        for p in plans:
            if p.site.kind == "embedding" and p.site.input is not None:
                ids = gf.val(p.site.input)
                if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
                    sizes = [s for s in ids.shape if not (isinstance(s, int) and s == 1)]
                    return sizes[0] if sizes else ids.shape[0]
        for p in plans:
            ar = p.site.all_reduce
            if p.strategy and ar is not None:
                v = gf.val(ar.input)
                if isinstance(v, torch.Tensor) and v.dim() >= 1:
                    return next((s for s in v.shape if isinstance(s, torch.SymInt)), v.shape[0])
        return None

    def rewriter_group(self, ctx, config):
        return ctx.tp_group, ctx.rank

    def rank_local_values(self, plans):
        """Every TP-sharded site's matmul (or embedding), rewritten or not; every op of a fused MoE
        (its expert weights are sharded and hidden inside the op); and every matmul against a
        parameter that no site classifies (whatever cannot be classified may hold a TP shard, so
        it must see every token)."""
        from fxpasses.sites import unclassified_weight_matmuls

        out = []
        if plans:
            graph = plans[0].site.nodes[0].graph
            known = {p.site.matmul for p in plans if p.site.matmul is not None}
            out += [n for n in unclassified_weight_matmuls(graph) if n not in known]
        reduces = {n for p in plans if p.site.all_reduce is not None for n in p.site.all_reduce.nodes}
        for p in plans:
            site = p.site
            if site.kind == "moe":
                out += [n for n in site.nodes if n.op == "call_function" and n not in reduces]
            elif site.kind in TP_SHARDED_KINDS and site.matmul is not None:
                out.append(site.matmul)
        return out


TP_GRAPHS = _TPGraphs()


class Strategy:
    """One communication layout. Subclasses set the class attributes and implement `rewrite`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[GraphFamily] = TP_GRAPHS
    site_kinds: ClassVar[frozenset[str]] = frozenset()
    precedence: ClassVar[int] = 0
    default_patterns: ClassVar[dict[str, list[str]]] = {}  # kind -> prefix substrings ("*": all)
    # tokens stay sharded from one layer to the next (sequence parallelism): in one piece of vLLM's
    # FX split the residual must leave replicated, so this is the strategy left out first when the
    # whole rewrite would send more bytes than the original graph
    spans_layers: ClassVar[bool] = False

    def validate(self, config: "FxPassesConfig", tp: int, world: int) -> None:
        """Raise ConfigError (naming the fix) when `config` cannot run at this tp / world size."""

    def prepare_groups(self, config: "FxPassesConfig", ctx: "TPContext", create: bool = False):
        """This rank's view of the process groups beyond TP this strategy needs (None when it needs
        none). `create=True` creates them first (collective over their members; outside compilation
        only); without it a missing group is a RewriteError naming the fix."""
        return None

    def precheck(self, plan: "SitePlan", rw: "LayoutRewriter", ctx: "TPContext") -> str | None:
        """The reason this planned site cannot be rewritten, or None."""
        return None

    def rewrite(self, rw: "LayoutRewriter", plans: list["SitePlan"], ctx: "TPContext") -> None:
        raise NotImplementedError

    def after_propagation(self, rw: "LayoutRewriter", plans: list["SitePlan"], ctx: "TPContext") -> None:
        """Called once propagation has run: correct the plans whose outcome propagation decides."""

    def mine(self, plans: list["SitePlan"]) -> list["SitePlan"]:
        """The plans this strategy owns that are still to be rewritten."""
        from fxpasses.plan import SiteStatus

        return [p for p in plans if p.strategy == self.name and p.status is SiteStatus.PLANNED]

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


_REGISTRY: dict[str, Strategy] = {}
_ALIASES: dict[str, str] = {}
_discovered = False


def _normal(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register(strategy: Strategy) -> Strategy:
    """Add a strategy (or replace one of the same name); returns it."""
    if not getattr(strategy, "name", ""):
        raise ConfigError(f"{strategy!r} has no name")
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
