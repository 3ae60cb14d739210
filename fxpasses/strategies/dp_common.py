"""What OTP and MLP-TP share: the DP-attention graph family, its preconditions (for quantised W8A8
sites too: `quant_site_refusal`), the equal-token-count run-time check, in-graph weight slicing and
the memory note of the report.

DP-attention graphs (`DP_ATTENTION_GRAPHS`) are TP=1 graphs: every rank runs the whole model on its
own B tokens. OTP and MLP-TP rewrite one site (or one gate_up/down pair) at a time so that it
enters and leaves in the original layout (this rank's B tokens, Replicate over nothing): the
collectives they insert are internal to the site, no value outside it changes layout, so the layout
engine's propagation has nothing to carry. The pipeline still builds its LayoutRewriter on the
first enabled strategy's group (it supplies the token count, notes and created-node bookkeeping to
verification).

Equal token counts. OTP's all_to_all and MLP-TP's all_gather / reduce_scatter split and join the
token dimension in K equal parts, so every rank of a group must run the graph with the same token
count B. vLLM pads every DP rank's batch to the group's largest only on steps that run CUDA graphs
(vLLM 0.32's `coordinate_batch_across_dp`: padding when the synced cudagraph mode is not NONE, or
when microbatching); a step above the capture sizes, and every step of an engine without CUDA
graphs (vLLM's CPU engine), runs each rank's own count. The deployment must guarantee equal counts
(vllm-ascend's DP padding, or CUDA graphs at every size). With
unequal counts the collectives would hang or mix up rows. With `check_token_counts` (or `strict`)
the rewrite inserts `fxpasses::check_group_tokens` (`fxpasses.runtime_ops`) before the first collective of each group: it
all-gathers the counts (one int per rank) and raises the same clear error on every rank of the group.
"""
from __future__ import annotations

import operator
from typing import ClassVar

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import op_forms
from fxpasses import topology
from fxpasses.context import GroupRef, TPContext
from fxpasses.rewriter import packable
from fxpasses.sites import Site
from fxpasses.strategies import registry
from fxpasses.strategies.interface import GraphFamily, Strategy

aten = torch.ops.aten


TOKEN_CHECK_STATE = "dp_token_check"  # LayoutRewriter.state() slot: groups already checked (OTP + MLP-TP)


def tag(node: fx.Node, role: str, strategy: str) -> fx.Node:
    return gf.tag_node(node, role=role, strategy=strategy)


def quantized_in_out(mm: fx.Node) -> op_forms.Matmul | None:
    """The record of a quantised platform matmul with an [in, out] weight (vllm-ascend's W8A8
    `npu.npu_quant_matmul`), or None."""
    form = gf.platform_form(mm, op_forms.Matmul)
    return form if form is not None and form.quantized and form.weight_layout == "in_out" else None


def dp_precheck(site: Site, ctx: TPContext, weight_format: str = "unknown", quantized: bool = False) -> str | None:
    """Reasons shared by OTP and MLP-TP sites (`weight_format`: the config's, for platform matmuls
    whose weight may be in a private layout, see `fxpasses.op_forms.weight_block_refusal`).
    `quantized`: a quantised platform matmul with an [in, out] weight (`quantized_in_out`) is
    accepted too (MLP-TP checks the rest of its form itself); otherwise aten.mm / aten.addmm only."""
    if ctx.tp != 1:
        return (f"o_proj/MLP TP rewrites DP-attention graphs whose linears run at TP=1; this graph was "
                f"traced at tp={ctx.tp}")
    if site.all_reduce is not None:
        return "a TP all-reduce follows this layer; the DP-attention strategies expect the TP=1 graph"
    if site.matmul is None:
        return "no matmul found inside the layer"
    if site.weight is None:
        return ("the weight is not visible in the graph (packed oneDNN `_C.onednn_mm`); an in-graph "
                "weight slice is impossible, shard the weight at load time instead")
    form = gf.platform_form(site.matmul, op_forms.Matmul)
    why = op_forms.weight_block_refusal(form, site.weight, weight_format) if form is not None else None
    if why:
        return f"the weight is sliced in the graph: {why}"
    name = gf.op_name(site.matmul)
    if name not in ("aten::mm", "aten::addmm") and not (quantized and quantized_in_out(site.matmul)):
        also = ", or a quantised platform matmul with an [in, out] weight" if quantized else " only"
        return f"matmul form {name} is not supported (aten.mm / aten.addmm{also})"
    if site.weight.op != "placeholder":
        return "the weight is computed in the graph, not a graph input"
    return None


def quant_site_refusal(site: Site, rw, strategy: str, shard_token_scale: bool = False) -> str | None:
    """Why a quantised site (`quantized_in_out`) cannot be rewritten with its int8 input on the wire,
    or None; from facts every rank's graph shares. `shard_token_scale`: the rewrite quantises the
    site's input per rank over a feature shard (MLP-TP's down_proj), so a per-token scale differs
    per rank and an integer bias (added to the accumulator, then scaled) would take rank 0's."""
    mm, w = site.matmul, site.weight
    form = quantized_in_out(mm)
    op = gf.op_name(mm)
    if rw.config.int8_comm == "off":
        return (f"int8_comm='off': {strategy} rewrites a quantised layer only with its int8 input on the wire "
                "(the graph quantises it before the layer); set int8_comm='auto' to allow it")
    if len(form.channel_args) != 1 or len(form.token_args) > 1:
        return f"{op}: a quantised form with {form.channel_args} / {form.token_args} is not one {strategy} knows"
    if form.offset and op_forms.arg(mm, form.offset) is not None:
        return f"{op} has an output offset; {strategy}'s quantised form takes none"
    x = op_forms.arg(mm, form.x)
    xv, wv = gf.val(x), gf.val(w)
    if not (isinstance(xv, torch.Tensor) and xv.dim() == 2 and xv.dtype == torch.int8 and rw.is_token_major(x)):
        return "the quantised input is not an int8 [tokens, features] tensor"
    if not (isinstance(wv, torch.Tensor) and wv.dim() == 2 and wv.dtype == torch.int8
            and all(isinstance(d, int) for d in wv.shape)):
        return "the weight is not a static int8 [in, out] matrix"
    if not gf.same_size(xv.shape[1], wv.shape[0]):
        return f"the input has {xv.shape[1]} features, the [in, out] weight {wv.shape[0]} rows"
    scale = op_forms.arg(mm, form.channel_args[0])
    sv = gf.val(scale)
    if not (gf.is_stored_value(scale) and isinstance(sv, torch.Tensor) and sv.dim() == 1 and sv.shape[0] == wv.shape[1]):
        return f"the dequant scale {form.channel_args[0]!r} is not a per-output-channel [{wv.shape[1]}] parameter"
    pts = op_forms.arg(mm, form.token_args[0]) if form.token_args else None
    if pts is not None and not (isinstance(pts, fx.Node) and rw.is_token_major(pts) and packable(x, pts)):
        return "the per-token scale is not a float32 [tokens] tensor"
    b = site.bias
    if b is not None:
        bv = gf.val(b)
        if not (isinstance(bv, torch.Tensor) and bv.dim() == 1 and bv.shape[0] == wv.shape[1]):
            return f"the bias is not a [{wv.shape[1]}] vector"
        if shard_token_scale and pts is not None and not bv.dtype.is_floating_point:
            return ("an integer bias joins the accumulator and is scaled by the per-token scale, which "
                    f"{strategy} computes per rank over a feature shard: the bias would be scaled by group rank 0's")
    out = gf.val(mm)
    if not (isinstance(out, torch.Tensor) and out.dtype.is_floating_point):
        return "the quantised matmul does not dequantise to a float output"
    return None


def weight_val(site: Site):
    v = gf.val(site.weight)
    return v if isinstance(v, torch.Tensor) and v.dim() == 2 else None


def out_in(site: Site):
    """(output features, input features) of the site's 2-D weight, in either layout ([out, in] for
    aten.mm / addmm, the record's `weight_layout` for a platform matmul); None when not 2-D."""
    v = weight_val(site)
    if v is None:
        return None
    form = gf.platform_form(site.matmul, op_forms.Matmul) if site.matmul is not None else None
    return (v.shape[1], v.shape[0]) if form is not None and form.weight_layout == "in_out" else (v.shape[0], v.shape[1])


def matmul_rhs_is_weight_t(site: Site) -> bool:
    """The matmul's right operand is weight.T (permute [1, 0] / t of the weight placeholder)."""
    mm = site.matmul
    rhs = mm.args[1] if gf.op_name(mm) == "aten::mm" else mm.args[2]
    if rhs is site.weight:
        return False
    n = gf.op_name(rhs)
    return rhs.args[0] is site.weight and (n == "aten::t" or (n == "aten::permute" and list(rhs.args[1]) == [1, 0]))


def emit_matmul(graph: fx.Graph, x: fx.Node, w_local: fx.Node, bias: fx.Node | None, strategy: str) -> fx.Node:
    """x @ w_local.T (+ bias): the same aten form the post-grad graph uses for a linear."""
    wt = tag(graph.call_function(aten.permute.default, (w_local, [1, 0])), "weight_t", strategy)
    if bias is not None:
        return tag(graph.call_function(aten.addmm.default, (bias, x, wt)), "matmul", strategy)
    return tag(graph.call_function(aten.mm.default, (x, wt)), "matmul", strategy)


def maybe_check_tokens(graph: fx.Graph, x: fx.Node, group: GroupRef, config, checked: set, where: str,
                       strategy: str) -> fx.Node:
    """Insert the run-time token-count check before the first collective on `group` (debug/strict)."""
    if not (config.check_token_counts or config.strict):
        return x
    if group.c10d_name in checked:
        return x
    checked.add(group.c10d_name)
    return tag(graph.call_function(torch.ops.fxpasses.check_group_tokens.default,
                                   (x, group.c10d_name, group.size, where)), "token_check", strategy)


def mul_node(graph: fx.Graph, a, b):
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return graph.call_function(operator.mul, (a, b))
    return a * b


def resident_note(strategy: str, k: int, sites: list[tuple[str, int]]) -> tuple[str, dict]:
    """(note, extra) for the report: the full weight stays resident; what a load-time shard saves."""
    full = sum(b for _, b in sites)
    save = full - full // k
    note = (f"{strategy}: weights are sliced in-graph (aten.slice/narrow, no communication), so the full "
            f"weight of each of the {len(sites)} rewritten layer(s) stays resident ({full / 2**20:.3f} MiB per "
            f"rank); sharding them at load time (K={k}) would save {save / 2**20:.3f} MiB per rank "
            f"((K-1)/K of it)")
    return note, {"full_weight_bytes": full, "load_time_shard_saving_bytes": save, "k": k,
                  "layers": [p for p, _ in sites]}


def nbytes(v: torch.Tensor) -> int:
    try:
        return int(v.numel()) * v.element_size()
    except Exception:
        return 0


class _DPAttentionGraphs(GraphFamily):
    """TP=1 graphs of a DP-attention deployment: the groups are the strategies' own."""

    name = "dp_attention"
    # the original graph is the TP=1 graph: the layout's collectives are its price, by design
    bounded_by_original_bytes = False

    def validate(self, config, tp, world):
        pass  # each strategy checks its group size against the world

    def nothing_to_do(self, ctx):
        if ctx.world < 2:
            return f"world={ctx.world}: nothing to rewrite"
        return None

    def token_count(self, plans):
        """dim 0 of the first owned site's activation (no all-reduce at TP=1)."""
        for p in plans:
            if p.strategy and p.site.input is not None:
                v = gf.val(p.site.input)
                if isinstance(v, torch.Tensor) and v.dim() >= 1:
                    return v.shape[0]
        return None

    def rewriter_group(self, ctx, config):
        """The first enabled strategy's group (created beforehand by `prepare_process_groups`)."""

        groups = [registry.get(n).prepare_groups(config, ctx) for n in config.strategies]
        first = next(g for g in groups if g is not None)
        return first.ref, first.rank


DP_ATTENTION_GRAPHS = _DPAttentionGraphs()


class DPAttentionStrategy(Strategy):
    """A strategy over DP-attention graphs with one group of K consecutive ranks, K read from the
    config key `size_key` (0 = the world size); the group's kind is the strategy's name."""

    family = DP_ATTENTION_GRAPHS
    size_key: ClassVar[str]

    def validate(self, config, tp, world):
        topology.check_dp_size(world, getattr(config, self.size_key) or world, self.size_key)

    def prepare_groups(self, config, ctx, create=False):
        return topology.dp_group(ctx, self.name, getattr(config, self.size_key), create=create)
