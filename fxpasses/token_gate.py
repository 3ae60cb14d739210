"""`min_tokens: auto`: is a rewrite worth it over the token counts a graph will run at?

The α-β time of one step of a graph, per rank, at T tokens:

    Σ over its collectives   latency(kind) + send_bytes(T) / bandwidth(kind)
  + Σ over its token-wise ops 2 x bytes written(T) / memory bandwidth     (one write, one read)

and a rewrite is judged by the difference of the two graphs' times.

Bytes come exactly from the graph (`fxpasses.comm_volume` for the collectives, the fake shapes of
the floating-point activations every other op writes with a token dimension: norms, residual adds,
activations; matmuls, views and collectives are left out of the second sum). Ranks' graphs differ
in small ways (vLLM folds rank 0's vocabulary offset, adds rank 0's row bias): the token-wise terms
both graphs share cancel before anything is evaluated, so every rank decides alike. The constants are the platform's
(`fxpasses.link_costs`, the config's `link_costs` over them).

`judge(before, after, ...)` keeps a rewrite for a token range [lo, hi] only where the rewritten
graph's modelled time is no worse than the original's at both ends and at every padding phase
above lo (T = lo .. lo + tp - 1: the worst case of the rewrite's padding). Where vLLM compiles one
graph for every size, the range is [1, max_num_batched_tokens], decode sizes included.
`analytic_min_tokens` is the same rule on the advisor's per-layer model of a decoder (no graph
yet): the vLLM plugin adds its result to `compile_ranges_endpoints` so that vLLM compiles a range
below and a range from it, and the pass decides each from its graph.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxpasses import comm_volume
from fxpasses import graph_forms as gf
from fxpasses.advisor import AdvisorError, dims_from_config
from fxpasses.link_costs import LinkCosts

@dataclass
class GraphCost:
    """What a step of one graph costs, symbolic in its token symbols."""

    collectives: Counter          # (kind, send-bytes expression) -> count
    token_wise: Counter           # written-bytes expression -> count
    symbols: list

    def comm_us(self, T: int, costs: LinkCosts) -> float:
        subs = {s: T for s in self.symbols}
        return sum(n * costs.link(kind).time_us(comm_volume.evaluate(e, subs))
                   for (kind, e), n in self.collectives.items())


def token_wise_delta_us(before: GraphCost, after: GraphCost, T: int, costs: LinkCosts) -> float:
    """µs the token-wise ops of `after` take more than those of `before` at T tokens. Identical
    terms cancel before anything is evaluated, so ops a rank has alone (vLLM folds rank 0's vocab
    offset, adds rank 0's row bias) and the rewrite leaves alone add exactly nothing on any rank."""
    diff = Counter(after.token_wise)
    diff.subtract(before.token_wise)
    subs = {s: T for s in before.symbols or after.symbols}
    written = sum(n * comm_volume.evaluate(e, subs) for e, n in diff.items() if n)
    return 2 * written / (costs.memory_gbps * 1e3)


def _has_token_dim(v: Any, symbols: set) -> bool:
    return isinstance(v, torch.Tensor) and any(
        isinstance(s, torch.SymInt) and s.node.expr.free_symbols & symbols for s in v.shape)


def _written(node: fx.Node, symbols: set) -> list:
    """Bytes expressions of the token-sized activations (floating point, 2-D or more) a token-wise
    op writes ([] for any other node: matmuls, views, collectives, index arithmetic)."""
    if node.op != "call_function" or gf.is_getitem(node):
        return []
    if getattr(node.target, "is_view", False) or gf.is_matmul(node) or gf.collective_kind(node):
        return []
    if gf.op_name(node).startswith(("fxpasses::", "_c10d_functional::", "vllm::all_", "vllm::reduce")):
        return []
    v = gf.val(node)
    vals = v if isinstance(v, (list, tuple)) else [v]
    return [comm_volume.numel_bytes(t) for t in vals
            if _has_token_dim(t, symbols) and t.dim() >= 2 and t.dtype.is_floating_point]


def graph_cost(graph: fx.Graph, group_sizes: dict[str, int], default_group_size: int) -> GraphCost:
    symbols = comm_volume.token_symbols(graph)
    coll = Counter((v.kind, v.send_bytes) for v in comm_volume.collective_volumes(graph, group_sizes,
                                                                                  default_group_size)
                   if not v.one_time)
    syms = set(symbols)
    tw: Counter = Counter()
    for node in graph.nodes:
        for e in _written(node, syms):
            tw[e] += 1
    return GraphCost(coll, tw, symbols)


@dataclass
class Verdict:
    keeps: bool
    token_range: tuple[int, int | None]
    points: list[dict] = field(default_factory=list)   # [{"tokens", "comm_before_us", "comm_after_us", "delta_us"}]
    costs: dict = field(default_factory=dict)
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"keeps": self.keeps, "token_range": list(self.token_range), "points": self.points,
                "link_costs": self.costs, "why": self.why}


def range_points(lo: int, hi: int | None, tp: int) -> list[int]:
    """Both ends of [lo, hi] and every padding phase above lo."""
    top = hi if hi is not None else lo + tp - 1
    pts = set(range(lo, min(lo + tp - 1, top) + 1))
    pts.add(top)
    return sorted(pts)


def judge(before: fx.Graph, after: fx.Graph, token_range: tuple[int, int | None], tp: int,
          group_sizes: dict[str, int], costs: LinkCosts) -> Verdict:
    """Keep `after` for the token counts of `token_range` only where its modelled time is no more
    than `before`'s at every point of `range_points` (a static graph: at its own size). Every number
    is read off shapes all ranks share (see `token_wise_delta_us`), so every rank decides alike."""
    cb, ca = graph_cost(before, group_sizes, tp), graph_cost(after, group_sizes, tp)
    lo, hi = token_range
    pts = range_points(lo, hi, tp) if cb.symbols else [None]
    out, worst = [], None
    for T in pts:
        b, a = cb.comm_us(T or 0, costs), ca.comm_us(T or 0, costs)
        delta = a - b + token_wise_delta_us(cb, ca, T or 0, costs)
        out.append({"tokens": T, "comm_before_us": round(b, 3), "comm_after_us": round(a, 3),
                    "delta_us": round(delta, 3)})
        if delta > 1e-6 * max(b, 1.0) and worst is None:
            worst = out[-1]
    rng = f"[{lo}, {hi if hi is not None else '...'}]" if cb.symbols else "(its static size)"
    if worst is None:
        why = (f"modelled time no worse over tokens {rng} on {costs.platform} "
               f"({', '.join(_point_text(p) for p in out)})")
        return Verdict(True, token_range, out, costs.to_dict(), why)
    at = worst["tokens"]
    why = (f"min_tokens=auto: at {at if at is not None else 'its'} tokens the rewritten graph would take "
           f"{worst['delta_us']:.1f} us more per step than without the pass (α-β model, {costs.platform} link "
           f"costs: {_brief(costs)}; collectives {worst['comm_after_us']:.1f} us against "
           f"{worst['comm_before_us']:.1f} us), and vLLM runs this graph for tokens {rng}; every site is left as "
           "it was. Set min_tokens to an explicit count (0 = always) to force it, or give measured link_costs")
    return Verdict(False, token_range, out, costs.to_dict(), why)


def _point_text(p: dict) -> str:
    return f"T={p['tokens']}: {p['delta_us']:+.1f} us"


def _brief(costs: LinkCosts) -> str:
    ls = "; ".join(f"{k} {v.latency_us:g} us + B/{v.gbps:g} GB/s" for k, v in costs.links.items())
    return f"{ls}; token-wise ops at {costs.memory_gbps:g} GB/s"


# ---- before any graph exists: the decoder model of the advisor -----------------------------------

def layer_time_us(strategy: str, T: int, *, costs: LinkCosts, **shape) -> float:
    """Modelled µs of one decoder layer's communication and residual-stream ops at T tokens: two
    add+norms writing two [T, H] tensors each, on T/tp rows where FlashComm1 shards the stream.
    `shape`: the fields of `fxpasses.comm_volume.LayerShape`."""
    sh = comm_volume.LayerShape(**shape)
    comm = sum(costs.link(kind).time_us(nb)
               for kind, nb in comm_volume.analytic_layer_collectives(strategy, T=T, **shape))
    rows = comm_volume.padded(T, sh.tp) // sh.tp if "flashcomm1" in strategy else T
    return comm + 2 * (2 * 2 * rows * sh.hidden * sh.dtype_bytes) / (costs.memory_gbps * 1e3)


def analytic_min_tokens(strategy: str, *, max_tokens: int, costs: LinkCosts, **shape) -> int | None:
    """The smallest N such that the layout is no slower than vanilla TP at every T in [N, max_tokens]
    (None: not even at max_tokens); `shape`: the fields of `fxpasses.comm_volume.LayerShape`."""
    n = None
    for T in range(max_tokens, 0, -1):
        if layer_time_us(strategy, T, costs=costs, **shape) > layer_time_us("vanilla", T, costs=costs, **shape) \
                * (1 + 1e-9):
            break
        n = T
    return n


def model_min_tokens(strategies: tuple[str, ...], hf_config: dict, *, tp: int, dtype_bytes: int, max_tokens: int,
                     costs: LinkCosts, k: int = 1) -> tuple[int | None, str]:
    """(N, why) for a decoder's HF config: `analytic_min_tokens` of the enabled layout, None when it
    does not pay up to `max_tokens` or has no layer model (DP-attention layouts are not gated)."""
    name = "+".join(strategies)
    if name not in ("flashcomm1", "flashcomm2", "flashcomm1+flashcomm2"):
        return None, f"{name} is not gated by token count"
    try:
        dims = dims_from_config(dict(hf_config), "model", dtype_bytes)
    except AdvisorError as e:
        return None, f"no layer model for this checkpoint ({e})"
    n = analytic_min_tokens(name, max_tokens=max_tokens, tp=tp, hidden=dims.hidden, attn_out=dims.attn_out,
                            dtype_bytes=dtype_bytes, costs=costs, k=k)
    if n is None:
        return None, (f"{name} is modelled slower than the all-reduces at every token count up to "
                      f"{max_tokens} on {costs.platform} ({_brief(costs)})")
    return n, f"{name} is modelled no slower from {n} tokens on {costs.platform} (hidden {dims.hidden}, tp {tp})"
