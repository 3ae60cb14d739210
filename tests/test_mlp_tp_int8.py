"""MLP-TP on W8A8-quantised MLPs, int8 on the wire (NPU stand-ins: vllm-ascend's `vllm.quantize`,
`npu.npu_dynamic_quant`, `npu.npu_quant_matmul`, `npu.npu_swiglu`; `fxpasses.testing.npu_standin`).

DP-attention graphs: every rank runs the TP=1 graph of the NPU-form decoder
(`fxpasses.testing.models.npu_tiny`, `moe_reduce=False`, `weight_format: nd`) on its OWN tokens.
MLP-TP all-gathers the graph's own int8 quantisation of the gate_up_proj input (dynamic: with the
float32 per-token scales as 4 more int8 columns of the same all_gather), runs gate_up_proj on this
rank's int8 weight columns, the activation and down_proj's input quantisation on this rank's I/K
features and down_proj on its int8 weight rows, then reduce-scatters.

* Static W8A8: the quantisation is the same, value for value (the gathered int8 values are the
  graph's; down_proj's per-channel quantisation runs on the same activation values, sliced), and
  every int8 product is exact in float64, so the only difference to the TP=1 graph is the order of
  the K partial sums of down_proj: float64 rounding, asserted as rel <= 1e-12 (measured <= 2.8e-16).
* Dynamic W8A8: down_proj's input is quantised per token over this rank's I/K features (as vLLM's
  own TP does per shard) instead of over all I. Per MLP, on the same input (the TP=1 graph is run
  with the rewritten graph's gate_up input injected):
  (1) the rewritten MLP output equals vLLM's TP computed with the graph's own ops per shard
      (`npu_dynamic_quant` of each I/K slice, `npu_quant_matmul` with that slice's weight rows,
      summed): float64 rounding, rel <= 1e-12. Any wrong slice, scale or collective misses this.
  (2) against the TP=1 graph, |y' - y| <= B[t, j] = sigma_t * ws_j * sum_i |Wq[i, j]| per element,
      sigma_t the TP=1 per-token scale, ws the per-output-channel weight scale, Wq the int8 [I, H]
      weight: both graphs dequantise a value of row t with an error of at most half its scale
      (round to nearest, |a / sigma| <= 127 by construction), and each shard's scale is at most
      sigma_t, so the two errors differ by at most sigma_t per feature. Plus 1e-9 of max |y| for
      float rounding. The bound has power: the K shards summed with the weight rows of the next
      shard (a wrong slice) and this group rank's partial alone (a missing reduce_scatter) both
      exceed it (asserted). Measured: the error is <= 0.15 of its bound and <= 2% of max |y|, the
      bound <= 0.35 of max |y|; the wrong slice is off by >= 0.9 max |y|, the lone partial by
      >= 0.28 max |y|. (The decoder's final output differs from the TP=1 graph's by rel <= 1.6%.)
* Structure: per MLP one all_gather (int8 input) and one reduce_scatter over the MLP-TP group,
  nothing else; the report says "int8 all_gather".
* Bytes (`fxpasses.comm_volume`): the all_gather moves 1 byte per element (+ 4 per token for the
  dynamic scales) against 2 for the bf16 float path (the tiny aten decoder's MLP-TP all_gather,
  same H = 64): static exactly 1/2, dynamic (H + 4) / (2 H) = 17/32.
* `int8_comm: off` skips the pair with that reason.
Every case is captured once (rank_capture caches per shape and config) and compared on token-count
sets made from a hypothesis-drawn seed (`helpers.token_sets`).
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings

from fxpasses.commands.tp_run.dp_harness import own_tokens, rank_compare_own_tokens
from fxpasses.commands.tp_run.harness import graph_args, rank_capture
from helpers import SEEDS, bundled_spec, edge_counts, examples, token_sets

BUILDER = "fxpasses.testing.models.npu_tiny:build_npu_decoder"
H = 64  # the bundled spec's hidden size (intermediate 128)
# static W8A8: per-channel quantisation vectors that differ per channel, so slicing down_proj's
# input quantisation to the wrong channels changes the output (npu_tiny's `scale_spread`)
SCALE_SPREAD = 0.25

# id: (world, mlp_tp_size (0 = world), quant, mlp_bias, layers)
CASES = {
    "w2-static-bias": (2, 0, "w8a8", True, 2),
    "w2-dynamic": (2, 0, "w8a8_dynamic", False, 2),
    "w4-K2-static": (4, 2, "w8a8", False, 2),
    "w4-K2-dynamic": (4, 2, "w8a8_dynamic", False, 2),
}


def _capture(pool, quant, mlp_bias, layers, k=0, dtype="float64", **cfg):
    config = {"strategies": ["mlp_tp"], "weight_format": "nd", "mlp_tp_size": k, **cfg}
    spec = bundled_spec(num_hidden_layers=layers, mlp_bias=mlp_bias)
    return pool.run(rank_capture, spec, config, dtype, False, builder=BUILDER,
                    builder_kwargs={"quant": quant, "moe_reduce": False, "scale_spread": SCALE_SPREAD})


def _case(dp_pools, case):
    world, k, quant, bias, layers = CASES[case]
    pool = dp_pools(world)
    return pool, _capture(pool, quant, bias, layers, k), world, k or world, quant, bias, layers


#: token-count sets per case and drawn seed (each set runs both quantisation checks per MLP)
SETS = examples(3)


# ---- on the ranks ---------------------------------------------------------------------------------

def rank_all_gathers(state, key):
    """(input dtype, send bytes at 4096 tokens per rank) of each per-step all_gather of the rewritten
    graph on this rank, in graph order."""
    from fxpasses import comm_volume
    from fxpasses import graph_forms as gf

    g = state["captures"][key]["cap"].graphs[0].graph
    subs = {s: 4096 for s in comm_volume.token_symbols(g)}
    byname = {n.name: n for n in g.nodes}
    out = []
    for v in comm_volume.collective_volumes(g, default_group_size=1):
        if v.kind == "all_gather" and not v.one_time:
            x = gf.val(gf.collective_input(byname[v.node]))
            out.append((str(x.dtype).removeprefix("torch."), int(v.at(subs)["send"])))
    return out


class _Recorder(fx.Interpreter):
    """Runs a graph, replacing the values of the nodes named in `inject`, keeping every value."""

    def __init__(self, gm, inject=None):
        super().__init__(gm)
        self.inject, self.values = inject or {}, {}

    def run_node(self, n):
        out = self.inject[n.name] if n.name in self.inject else super().run_node(n)
        self.values[n.name] = out
        return out


def rank_mlp_errors(state, key, token_counts, k, seed=0):
    """Per token count and per rewritten MLP (dynamic W8A8): the rewritten MLP output y' against
    (1) vLLM's TP over the group's K shards (the graph's own quantise / matmul ops per I/K slice) and
    (2) the TP=1 MLP, both on the same input (the rewritten graph's gate_up input injected into the
    TP=1 graph), with the quantisation bound B of the module docstring; and the errors a wrong slice
    (each shard summed with the next shard's weight rows) and a missing reduce_scatter (this group
    rank's partial alone) make against the TP=1 MLP."""
    from fxpasses import op_forms
    from fxpasses.strategies.dp_common import quantized_in_out

    entry, rank = state["captures"][key], state["rank"]
    cap = entry["cap"]
    sites = {x["prefix"]: x for x in entry["summary"]["report"]["sites"]}
    pairs = [(sites[p]["matmul"], sites[p.replace("gate_up_proj", "down_proj")]["matmul"])
             for p in sites if p.endswith("gate_up_proj") and sites[p]["status"] == "rewritten"]
    orig = {n.name: n for n in cap.originals[0].graph.nodes}
    new_g = cap.graphs[0].graph
    scatters = [n for n in new_g.nodes if n.meta.get("fxpasses", {}).get("collective") in
                ("reduce_scatter_wait", "reduce_scatter") and not any(
                    u.meta.get("fxpasses", {}).get("collective") == "reduce_scatter_wait" for u in n.users)]
    assert len(scatters) == len(pairs)
    out = []
    with torch.no_grad():
        for T in token_counts:
            ids = own_tokens(T, entry["spec"].vocab_size, seed, rank)
            _, args = graph_args(state, key, T, ids=ids)
            new = _Recorder(cap.graphs[0])
            new.run(*list(args))
            inject = {}
            for gu, _ in pairs:  # the gate_up input of every MLP, as the rewritten graph has it
                form = quantized_in_out(orig[gu])
                for name in (form.x, *form.token_args):
                    a = op_forms.arg(orig[gu], name)
                    if isinstance(a, fx.Node):
                        inject[a.name] = new.values[a.name]
            old = _Recorder(cap.originals[0], inject)
            old.run(*list(args))
            for (gu, dn), rs in zip(pairs, scatters):
                mm = orig[dn]
                form = quantized_in_out(mm)
                pts = op_forms.arg(mm, form.token_args[0])
                quant = pts.args[0]                      # the dynamic quantisation: getitem(q, 1)
                act = old.values[op_forms.arg(quant, "input").name]
                w = old.values[op_forms.arg(mm, form.weight).name]
                ws = old.values[op_forms.arg(mm, form.channel_args[0]).name]
                bias = op_forms.arg(mm, form.bias)
                bias = old.values[bias.name] if isinstance(bias, fx.Node) else None
                sigma = old.values[pts.name]
                y1 = old.values[dn].double()             # the TP=1 MLP output
                y = new.values[rs.name].double()         # the rewritten one
                ml = w.shape[0] // k

                def partials(shift):
                    """Shard s's int8 partial sum of down_proj, quantised per token over its I/K
                    features, with the weight rows of shard s + shift (shift 0: vLLM's TP)."""
                    out = []
                    for s in range(k):
                        q, sc = quant.target(act[:, s * ml:(s + 1) * ml])
                        rows = w[((s + shift) % k) * ml:((s + shift) % k + 1) * ml]
                        out.append(mm.target(q, rows, ws, pertoken_scale=sc, bias=bias if s == 0 else None,
                                             output_dtype=torch.float64))
                    return out

                ref, wrong = sum(partials(0)), sum(partials(1))
                alone = partials(0)[rank % k]            # no reduce_scatter: this group rank's own partial
                bound = sigma.double().unsqueeze(1) * ws.double() * w.double().abs().sum(0)
                scale = y1.abs().max().item()
                out.append({"T": T, "shape_ok": y.shape == y1.shape,
                            "rel_vs_tp": (y - ref).abs().max().item() / scale,
                            "max_err": (y - y1).abs().max().item(),
                            "excess": ((y - y1).abs() - bound - 1e-9 * scale).max().item(),
                            "err_over_bound": ((y - y1).abs() / bound).max().item(),
                            "max_bound": bound.max().item(), "max_y": scale,
                            "wrong_excess": ((wrong - y1).abs() - bound).max().item(),
                            "wrong_err": (wrong - y1).abs().max().item(),
                            "alone_excess": ((alone - y1).abs() - bound).max().item(),
                            "alone_err": (alone - y1).abs().max().item()})
    return out


# ---- the tests ------------------------------------------------------------------------------------

def _check_report(summaries, layers, k, dynamic, bias):
    for s in summaries:
        rep = s["report"]
        assert rep["applied"], rep["reason"]
        assert rep["collectives_before"] == {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0, "all_to_all": 0}
        assert rep["collectives_after"] == {"all_reduce": 0, "reduce_scatter": layers, "all_gather": layers,
                                            "all_to_all": 0}
        assert [list(f) for f in rep["fingerprint"]] == [["all_gather", "mlp_tp", str(k)],
                                                          ["reduce_scatter", "mlp_tp", str(k)]] * layers
        mlp = [x for x in rep["sites"] if x["strategy"] == "mlp_tp"]
        assert len(mlp) == 2 * layers and all(x["status"] == "rewritten" for x in mlp), mlp
        for x in mlp:
            if x["prefix"].endswith("gate_up_proj"):
                assert "int8 all_gather" in x["reason"], x
                assert ("per-token float32 scales" in x["reason"]) == dynamic, x
            else:
                assert ("per token over this rank's I/K features" in x["reason"]) == dynamic, x
                assert ("bias on group rank 0" in x["reason"]) == bias, x
    assert len({s["report"]["fingerprint_digest"] for s in summaries}) == 1


@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_mlp_tp_int8_matches_tp1_standin(dp_pools, case, seed):
    """Each case of CASES (the bundled shape: 2 layers, GQA 2, H 64, I 128), on SETS (3) token-count
    sets made from `examples(1)` drawn seeds: 1, world - 1, world, world + 1, 3 world + 1 and 3 to 6
    counts in 1..160, equal on every rank."""
    pool, summaries, world, k, quant, bias, layers = _case(dp_pools, case)
    dynamic = quant == "w8a8_dynamic"
    _check_report(summaries, layers, k, dynamic, bias)
    for colls in pool.run(rank_all_gathers, summaries[0]["key"]):
        assert [c[0] for c in colls] == ["int8"] * layers, colls   # dynamic: the scales ride along
    for counts in token_sets(seed, edge_counts(world), hi=160, n=SETS):
        for rank, results in enumerate(pool.run(rank_compare_own_tokens, summaries[0]["key"], counts)):
            assert [r["T"] for r in results] == counts
            for r in results:
                assert r["shape_ok"], (rank, r)
                if not dynamic:
                    assert r["rel"] <= 1e-12, (rank, r)
        if dynamic:
            for rank, results in enumerate(pool.run(rank_mlp_errors, summaries[0]["key"], counts, k)):
                assert len(results) == len(counts) * layers
                for r in results:
                    assert r["shape_ok"], (rank, r)
                    assert r["rel_vs_tp"] <= 1e-12, (rank, r)       # vLLM's TP, shard for shard
                    assert r["excess"] <= 0.0, (rank, r)            # within the quantisation bound
                    assert r["wrong_excess"] > 0.0, (rank, r)       # a wrong slice is not,
                    assert r["alone_excess"] > 0.0, (rank, r)       # nor a missing reduce_scatter


def test_mlp_tp_int8_bytes_against_bf16_standin(dp_pools):
    """The int8 all_gather against the bf16 all_gather of the float path (tiny aten decoder, same H):
    1/2 static, (H + 4) / (2 H) dynamic, layer for layer, at 4096 tokens per rank. (The int8 side is
    read off the float64 captures: the all_gather moves the graph's int8 values, whatever the
    model's float dtype.)"""
    pool = dp_pools(2)
    spec = bundled_spec(num_hidden_layers=2, mlp_bias=True)
    flt = pool.run(rank_capture, spec, {"strategies": ["mlp_tp"]}, "bfloat16", False)
    float_colls = pool.run(rank_all_gathers, flt[0]["key"])[0]
    assert [c[0] for c in float_colls] == ["bfloat16"] * 2, float_colls
    for quant, bias, want in (("w8a8", True, Fraction(1, 2)), ("w8a8_dynamic", False, Fraction(H + 4, 2 * H))):
        summaries = _capture(pool, quant, bias, 2)
        colls = pool.run(rank_all_gathers, summaries[0]["key"])[0]
        assert [c[0] for c in colls] == ["int8"] * 2, colls
        assert [Fraction(a[1], b[1]) for a, b in zip(colls, float_colls)] == [want] * 2, (quant, colls, float_colls)


def test_int8_comm_off_skips_quantised_mlp_standin(dp_pools):
    pool = dp_pools(2)
    summaries = _capture(pool, "w8a8", False, 1, int8_comm="off")
    for s in summaries:
        rep = s["report"]
        mlp = [x for x in rep["sites"] if x["strategy"] == "mlp_tp"]
        assert len(mlp) == 2, rep["sites"]
        for x in mlp:
            assert x["status"] == "skipped" and "int8_comm='off'" in x["reason"], x
        assert rep["collectives_after"] == rep["collectives_before"]
        assert "all_gather" not in s["after"] and "reduce_scatter" not in s["after"]
