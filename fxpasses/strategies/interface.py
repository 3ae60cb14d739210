"""The strategy contract: what a strategy implements, and who calls what.

A strategy is one communication layout, one `Strategy` subclass instance registered with
`fxpasses.strategies.registry.register` (a built-in one is a module of `fxpasses.strategies`
defining a module-level `STRATEGY`; the registry discovers it). It declares

* `name` and `aliases`: how configurations spell it;
* `family`: which graphs it rewrites, a `GraphFamily` (`fxpasses.strategies.tp_family.TP_GRAPHS`,
  vanilla tensor-parallel graphs, or `fxpasses.strategies.dp_common.DP_ATTENTION_GRAPHS`, DP-attention
  graphs); strategies of different families cannot be combined;
* `site_kinds` and `precedence`: the kinds of site it may own; when several enabled strategies want
  one site the highest precedence owns it and the others are its fallbacks, in order
  (`fxpasses.plan`);
* `default_patterns`: the prefixes it owns when the pattern set has no table for it
  (`{kind: [prefix substring, ...]}`, `"*"` for all; a pattern set's `[strategies.<name>]` table
  overrides it, `fxpasses.patterns_loader`);
* `spans_layers`: its tokens stay sharded from one layer to the next (the pipeline drops such a
  strategy first when the whole rewrite would send more bytes than the original graph).

and implements

* `rewrite(rw, plans, ctx)` (required): rewrite the sites it owns (`self.mine(plans)`) with the
  `LayoutRewriter`'s public primitives (`fxpasses.rewriter`: `gather`, `local_shard`,
  `to_shard0_from_partial`, `replace_all_reduce`, ...) and mark each plan `done(how)` or
  `skip(reason)`. A node it inserts itself, outside those primitives, is declared with
  `rw.mark_created(node)` (and its layout with `rw.mark_shard0` / `rw.mark_rank_local`) so that
  propagation and verification know it;
* `validate(config, tp, world)`: raise `ConfigError`, naming the fix, for sizes it cannot run with
  (config parsing calls it, at start-up);
* `prepare_groups(config, ctx, create)`: the process groups beyond TP it needs
  (`fxpasses.topology`); `fxpasses.worker_groups` calls it with `create=True` at worker start, the
  rewrite looks them up (`create=False`) - never a group created inside a compilation;
* `precheck(plan, rw, ctx)`: the reason one planned site cannot be rewritten, or None. Before any
  rewrite the pipeline asks it about each owned site that has a fallback and hands a refused one to
  the next strategy that wants it; `rewrite` asks it about the rest and skips a refused site;
* `after_propagation(rw, plans, ctx)`: correct plans whose outcome the propagation walk decides.

The pipeline (`fxpasses.pipeline`) calls, per graph: `precheck` for each owned site with a
fallback, `rewrite` once per enabled strategy in ascending precedence, then propagation, `after_propagation`, the
bytes rule and verification; the rewrite is kept or dropped as a whole.

The annotations name types of modules above this one (`fxpasses.config.FxPassesConfig`,
`fxpasses.rewriter.LayoutRewriter`); they are not imported, so that this contract stays at the
bottom of the import graph.
"""
from __future__ import annotations

from typing import ClassVar

from fxpasses.context import GroupRef, TPContext
from fxpasses.site_records import SitePlan, SiteStatus


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


class Strategy:
    """One communication layout. Subclasses set the class attributes and implement `rewrite`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    # required: `fxpasses.strategies.tp_family.TP_GRAPHS` or `dp_common.DP_GRAPHS` (or a family of its own)
    family: ClassVar[GraphFamily]
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
        return [p for p in plans if p.strategy == self.name and p.status is SiteStatus.PLANNED]

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"
