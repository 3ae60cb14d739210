"""Named mutants of the rewrite: faults injected from outside the library, to prove the suite can fail.

Each mutant patches fxpasses' modules in the process that activates it (`activate(name)`); the
library has no mutant switch. `FXPASSES_TESTING_MUTANT=<name>` activates one in a whole pytest run:
`tests/conftest.py` activates it in the test process and `fxpasses.commands.tp_run.pool` in every rank
worker it spawns, so rank-side rewrites and runtime ops are mutated too; the test suite's vLLM plugin
(tests/vllm_test_plugin) calls `activate_from_env` in every vLLM process, so an engine's pass is
mutated too (`fxpasses check` against a mutant must exit 1). `tools/mutation_score.py`
runs each mutant's kill tests in a fresh process and prints the score.

A mutant names the tests meant to kill it (`kills`, pytest node ids under tests/, all in the fast
tier); a mutant is killed when those tests fail with it and pass without it.
"""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Callable

ENV = "FXPASSES_TESTING_MUTANT"


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    apply: Callable[[], None]
    kills: tuple[str, ...]


MUTANTS: dict[str, Mutant] = {}


def mutant(what: str, *kills: str):
    def deco(fn):
        MUTANTS[fn.__name__] = Mutant(fn.__name__, what, fn, kills)
        return fn
    return deco


_ACTIVE: list[str] = []
_KEEP: list = []   # context managers a mutant entered for good


def activate(name: str) -> None:
    """Apply the mutant `name` in this process (once)."""
    if name not in MUTANTS:
        raise KeyError(f"unknown mutant {name!r}; known: {', '.join(sorted(MUTANTS))}")
    if name not in _ACTIVE:
        MUTANTS[name].apply()
        _ACTIVE.append(name)


def activate_from_env() -> str | None:
    name = os.environ.get(ENV)
    if name:
        activate(name)
    return name or None


def _wrap(owner, attr: str, make):
    """owner.attr = make(original)."""
    setattr(owner, attr, make(getattr(owner, attr)))


# ---- kill tests (node ids under tests/) -------------------------------------------------------------
FC1_TP2 = "test_fc1_equivalence.py::test_flashcomm1_matches_vanilla_tp2"
FC1_TP4 = "test_fc1_equivalence.py::test_flashcomm1_matches_vanilla_tp4_float64"
FC2 = "test_flashcomm2.py::test_flashcomm2_matches_vanilla_tp_float64"
FC2_BIAS = "test_flashcomm2.py::test_o_proj_bias_is_added_once_by_tp_rank_0"
FC2_REGATHER = "test_flashcomm2.py::test_weight_updated_in_place_is_gathered_again"
MOE = "test_moe_mla_parallel_residual.py::test_moe_block_reduce_scatters_and_gathers_its_input_once_tp2"
EXCLUDED = "test_excluded_tp_sites.py::test_excluded_tp_sites_stay_exact_tp2"
DP = "test_otp_mlp_tp.py::test_dp_rewrite_matches_own_tp1_output"
DP_CHECK = "test_otp_mlp_tp.py::test_unequal_token_counts_raise_clearly"
INT8 = "test_int8_on_the_wire.py"
MLP_INT8 = "test_mlp_tp_int8.py::test_mlp_tp_int8_matches_tp1_standin"
LOWERING = "test_lowering.py::test_reference_lowering_matches_unfused_tp2"
BATCH1 = "test_site_finding.py::test_a_batch_of_one_layout_is_sharded_along_its_token_dim"
BYTES = "test_pipeline_policies.py::test_a_static_graph_whose_padding_costs_bytes_is_kept_as_it_was"
VERIFY = "test_pipeline_policies.py::test_a_rewrite_that_breaks_the_graph_is_refused_by_verification"
GATE = "test_token_gate.py"
VOLUME = "test_comm_volume.py"
RANKS = "test_rank_consistency.py"
POSITIONS = "test_fc1_equivalence.py::test_a_replicated_position_table_is_sliced_in_place_tp2"


# ---- the FlashComm1 layout primitives (fxpasses.rewriter) ------------------------------------------------

# Replicate -> Shard0 without communication happens where a sharded value meets a replicated token
# value in one token-wise op: GPT-2's replicated position rows added to the sharded token embedding
@mutant("Replicate -> Shard0 without communication takes the next rank's chunk (shard offset off by one shard)",
        POSITIONS)
def shard_offset_of_the_next_rank():
    from fxpasses import rewriter

    done: set = set()

    def make(orig):
        def local_shard(self, value):
            out = orig(self, value)   # cached per value: shift each narrow once
            if out not in done:
                padded, td, start, chunk = out.args
                with self.graph.inserting_before(out):
                    out.args = (padded, td, self.sym(operator.mul, chunk, (self.rank + 1) % self.n), chunk)
                done.add(out)
            return out
        return local_shard
    _wrap(rewriter.LayoutRewriter, "local_shard", make)


@mutant("no zero rows appended before a reduce-scatter (T not divisible by tp)", FC1_TP2)
def padding_missing():
    from fxpasses import rewriter
    rewriter.LayoutRewriter._pad = lambda self, x: x


@mutant("the zero rows go before the tokens instead of after them", FC1_TP2)
def padding_at_the_wrong_end():
    from fxpasses import rewriter

    def make(orig):
        def _pad(self, x):
            out = orig(self, x)
            spec = list(out.args[1])
            spec[-2], spec[-1] = spec[-1], spec[-2]
            out.args = (out.args[0], spec, *out.args[2:])
            return out
        return _pad
    _wrap(rewriter.LayoutRewriter, "_pad", make)


def _edit_unpads(edit):
    """Wrap `LayoutRewriter.gather`: after a value's first gather, `edit(rewriter, node)` every unpad
    slice (`aten.slice(gathered, 0, 0, T)`, role "unpad") still ending at the token count."""
    from fxpasses import rewriter

    def make(orig):
        def gather(self, value):
            fresh = value not in self._gathered
            out = orig(self, value)
            if fresh:
                for n in self.graph.nodes:
                    if n.meta.get("fxpasses", {}).get("role") == "unpad" and len(n.args) == 4 \
                            and n.args[2] == 0 and n.args[3] is self.token_count_node():
                        edit(self, n)
            return out
        return gather
    _wrap(rewriter.LayoutRewriter, "gather", make)


@mutant("an all-gather's padding rows are kept (no slice back to T rows)", FC1_TP2)
def unpad_missing():
    def keep_padding(rw, n):
        n.args = (*n.args[:3], rw.padded_count()[1])
    _edit_unpads(keep_padding)


@mutant("a Shard0 value is handed to a consumer that needs all rows without its all-gather", FC1_TP2)
def gather_skipped():
    from fxpasses import rewriter
    rewriter.LayoutRewriter.gather = lambda self, value: value


def _rolled(graph, x, rows):
    """`x` rolled down by `rows` along dim 0, as slices and a cat: ops Inductor lowers (it has no
    lowering for aten.roll, only a decomposition that post-grad nodes never get, so a roll node
    inserted there fails the compile and the engine never runs)."""
    import torch

    aten = torch.ops.aten
    n = graph.call_function(aten.sym_size.int, (x, 0))
    cut = graph.call_function(operator.sub, (n, rows))
    tail = graph.call_function(aten.slice.Tensor, (x, 0, cut, n))
    head = graph.call_function(aten.slice.Tensor, (x, 0, 0, cut))
    return graph.call_function(aten.cat.default, ([tail, head], 0))


@mutant("the reduce-scatter hands every rank the next rank's rows (its result taken from the wrong rank; "
        "FlashComm1, OTP and MLP-TP alike)", FC1_TP2, FC1_TP4, DP)
def reduce_scatter_rows_of_the_next_rank():
    import torch

    from fxpasses import comm
    aten = torch.ops.aten

    def make(orig):
        def reduce_scatter(self, graph, x, group):
            rows = graph.call_function(operator.floordiv, (graph.call_function(aten.sym_size.int, (x, 0)), group.size))
            return orig(self, graph, _rolled(graph, x, rows), group)
        return reduce_scatter
    _wrap(comm.CommBackend, "reduce_scatter", make)


@mutant("a partial sum is sharded without being reduced (Partial -> Shard0 as a local chunk)", FC1_TP2)
def partial_sharded_without_its_reduce():
    from fxpasses import rewriter
    rewriter.LayoutRewriter.to_shard0_from_partial = lambda self, partial: self.local_shard(partial)


@mutant("an MoE block's all-reduce (a reduce site) becomes a local chunk: its sum is left partial", MOE)
def moe_block_reduce_left_partial():
    from fxpasses.strategies import flashcomm1

    def make(orig):
        def rewrite(self, rw, plans, ctx):
            blocks = {p.site.all_reduce.input for p in plans if p.site.kind == "reduce" and p.site.all_reduce}
            real = rw.to_shard0_from_partial
            rw.to_shard0_from_partial = lambda partial: rw.local_shard(partial) if partial in blocks else real(partial)
            return orig(self, rw, plans, ctx)
        return rewrite
    _wrap(flashcomm1.FlashComm1, "rewrite", make)


@mutant("Shard0 rows are ceil(T/tp) computed as floor(T/tp)", FC1_TP2)
def shard_rows_rounded_down():
    from fxpasses import rewriter

    def make(orig):
        def _padding_values(self):
            if self._padding is None:
                rows, tpad, pad = orig(self)
                t = self.token_count_node()
                rows = self.sym(operator.floordiv, t, self.n)
                self._padding = (rows, tpad, pad)
            return self._padding
        return _padding_values
    _wrap(rewriter.LayoutRewriter, "_padding_values", make)


@mutant("all-gathers move float32 (precision lost on the wire)", FC1_TP2)
def all_gather_in_float32():
    import torch

    from fxpasses import comm
    aten = torch.ops.aten

    def make(orig):
        def all_gather(self, graph, x, group):
            from fxpasses import graph_forms as gf
            v = gf.val(x)
            if not (isinstance(v, torch.Tensor) and v.dtype == torch.float64):
                return orig(self, graph, x, group)
            low = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32})
            out = orig(self, graph, low, group)
            return graph.call_function(aten._to_copy.default, (out,), {"dtype": torch.float64})
        return all_gather
    _wrap(comm.CommBackend, "all_gather", make)


@mutant("a layer whose weight is sharded but that no strategy rewrites is fed this rank's token shard",
        EXCLUDED)
def unrewritten_sharded_layer_sees_shards():
    from fxpasses.strategies import tp_family
    tp_family._TPGraphs.rank_local_values = lambda self, plans: []   # no TP-sharded matmul is marked


@mutant("the token dim of [1, T, H] values is read as dim 0", BATCH1)
def token_dim_misread():
    from fxpasses import rewriter
    orig = rewriter.token_dim_of
    rewriter.token_dim_of = lambda t, T: (0 if orig(t, T) is not None else None)


@mutant("the all-gather's result is rolled by one shard (every rank's rows land one slot later)", FC1_TP2, FC1_TP4)
def all_gather_rows_rolled_by_one_shard():
    import torch

    from fxpasses import comm
    aten = torch.ops.aten

    def make(orig):
        def all_gather(self, graph, x, group):
            out = orig(self, graph, x, group)
            rows = graph.call_function(aten.sym_size.int, (x, 0))
            return _rolled(graph, out, rows)
        return all_gather
    _wrap(comm.CommBackend, "all_gather", make)


@mutant("the unpad keeps the last T rows of the gathered ones instead of the first T", FC1_TP2)
def unpad_from_the_wrong_end():
    def last_rows(rw, n):
        pad, tpad = rw.padded_count()
        n.args = (n.args[0], n.args[1], pad, tpad)
    _edit_unpads(last_rows)


@mutant("Replicate -> Shard0 chunks the unpadded value (the last rank's chunk is short or empty)", POSITIONS)
def local_shard_without_padding():
    from fxpasses import rewriter

    def make(orig):
        def local_shard(self, value):
            self._pad = lambda x: x
            try:
                return orig(self, value)
            finally:
                del self._pad
        return local_shard
    _wrap(rewriter.LayoutRewriter, "local_shard", make)


# ---- FlashComm2 ----------------------------------------------------------------------------------------

@mutant("FlashComm2 (K > 1): the tp chunks are sent in their natural order, not reordered for the ODP "
        "all-to-all (block order swapped)", FC2)
def flashcomm2_all_to_all_block_order():
    from fxpasses.strategies import flashcomm2
    orig = flashcomm2._send_rows

    def _send_rows(rw, g, t, k, n, b, kb, width):
        if k == 1:
            return orig(rw, g, t, k, n, b, kb, width)
        return orig(rw, g, t, 1, n, b, kb, width)
    flashcomm2._send_rows = _send_rows


@mutant("FlashComm2's ODP weight blocks are put side by side in reversed peer order", FC2)
def odp_weight_blocks_reversed():
    import torch

    from fxpasses import runtime_ops
    orig = runtime_ops._gather_odp_weight

    def _gather_odp_weight(w, bias, group_name, group_size):
        full = orig(w, bias, group_name, group_size)
        dl = w.shape[1]
        blocks = [full[:, p * dl:(p + 1) * dl] for p in range(group_size)][::-1]
        return torch.cat(blocks + [full[:, -1:]], 1).contiguous()
    runtime_ops._gather_odp_weight = _gather_odp_weight


@mutant("the ODP weight is not gathered again after an in-place weight update (stale cache)", FC2_REGATHER)
def odp_weight_not_regathered():
    from fxpasses import runtime_ops
    runtime_ops.tensor_version = lambda t: None if t is None else (t.data_ptr(), tuple(t.shape), t.dtype)


@mutant("FlashComm2's o_proj bias column counts every ODP peer's bias (the row bias added on every rank)",
        FC2_BIAS)
def flashcomm2_bias_from_every_peer():
    import torch

    from fxpasses import runtime_ops
    orig = runtime_ops._gather_odp_weight

    def _gather_odp_weight(w, bias, group_name, group_size):
        full = orig(w, bias, group_name, group_size)   # its last column: the peers' biases summed
        return torch.cat([full[:, :-1], full[:, -1:] * group_size], 1).contiguous()
    runtime_ops._gather_odp_weight = _gather_odp_weight


@mutant("FlashComm2 (K > 1) runs its all-to-all over the OTP group instead of the ODP group (wrong group)",
        FC2)
def flashcomm2_all_to_all_on_the_otp_group():
    from fxpasses import comm, topology

    def make(orig):
        def all_to_all(self, graph, x, group, chunk):
            for g in topology.cached_flashcomm2_groups().values():
                if g.otp is not None and g.odp.ranks == group.ranks and g.otp.size == group.size:
                    return orig(self, graph, x, g.otp, chunk)
            return orig(self, graph, x, group, chunk)
        return all_to_all
    _wrap(comm.CommBackend, "all_to_all", make)


# ---- OTP / MLP-TP (DP attention) -------------------------------------------------------------------------

@mutant("OTP / MLP-TP add the row bias on every group rank, not on group rank 0 only", DP)
def row_bias_on_every_rank():
    import torch

    from fxpasses.strategies import dp_common, mlp_tp, otp
    aten = torch.ops.aten
    biases: dict = {}

    def remember(orig):
        def rewrite(self, rw, plans, ctx):
            biases.update({p.site.weight: p.site.bias for p in plans if p.site.bias is not None})
            return orig(self, rw, plans, ctx)
        return rewrite
    _wrap(otp.OProjTP, "rewrite", remember)
    _wrap(mlp_tp.MLPTP, "rewrite", remember)
    orig_emit = dp_common.emit_matmul

    def emit_matmul(graph, x, w_local, bias, strategy):
        if bias is None and getattr(w_local, "target", None) is aten.slice.Tensor:
            bias = biases.get(w_local.args[0])
        return orig_emit(graph, x, w_local, bias, strategy)
    dp_common.emit_matmul = emit_matmul


@mutant("check_token_counts: unequal token counts across the group pass unnoticed", DP_CHECK)
def group_token_check_disabled():
    from fxpasses import runtime_ops
    runtime_ops.check_group_tokens.register_kernel("cpu")(lambda x, group_name, group_size, where: x.clone())


@mutant("OTP's all-to-all sends token-major blocks (no transpose to peer-major column blocks)", DP)
def otp_blocks_not_transposed():
    import torch

    from fxpasses.strategies import dp_common as dc
    from fxpasses.strategies import otp
    aten = torch.ops.aten

    def _send_blocks(g, t, B, k, dk):
        return g.call_function(aten.view.default, (t, [dc.mul_node(g, B, k), dk]))
    otp._send_blocks = _send_blocks


# ---- int8 on the wire ------------------------------------------------------------------------------------

@mutant("the float32 scale columns of an int8 all-gather are zeros (scales not packed)", INT8, MLP_INT8)
def int8_scale_columns_not_packed():
    import torch

    from fxpasses import rewriter
    aten = torch.ops.aten
    orig = rewriter.scale_columns

    def scale_columns(graph, sc, mark):
        cols = orig(graph, sc, mark)
        return mark(graph.call_function(aten.zeros_like.default, (cols,)), "int8_pack")
    rewriter.scale_columns = scale_columns


# ---- lowering ---------------------------------------------------------------------------------------------

@mutant("the reference lowering adds a row bias once inside the fused kernel and once after it", LOWERING)
def lowered_kernel_bias_twice():
    import dataclasses

    import torch

    from fxpasses.lowering import backends
    aten = torch.ops.aten
    orig = backends.REFERENCE.emit

    def emit(graph, site):
        out = orig(graph, site)
        bias = site.pair.ops.bias
        if bias is None or site.pair.kind != "mm_all_reduce":
            return out
        return graph.call_function(aten.add.Tensor, (out, bias))
    backends.BACKENDS["reference"] = dataclasses.replace(backends.REFERENCE, emit=emit)


# ---- the pipeline's guards ---------------------------------------------------------------------------

@mutant("verification is skipped: a rewrite whose checks fail is kept", VERIFY)
def verification_skipped():
    from fxpasses import pipeline
    from fxpasses.verify import Verification
    orig = pipeline.verify

    def verify(*a, **k):
        try:
            return orig(*a, **k)
        except Exception:
            return Verification([], "unverified")
    pipeline.verify = verify


@mutant("the bytes rule is disabled: a rewrite that sends more bytes per step is kept", BYTES)
def bytes_rule_disabled():
    from fxpasses import pipeline

    def _more_bytes(before, after, config, ctx, report, tokens, graph_mode=None):
        return None
    pipeline._more_bytes = _more_bytes


@mutant("rank 1 takes another decision: it leaves its last reduce site in the original layout",
        FC1_TP2, RANKS)
def one_rank_decides_differently():
    from fxpasses import pipeline

    def make(orig):
        def _rewrite(work, plans, config, ctx):
            if ctx.rank == 1:
                rows = [p for p in plans if p.strategy and p.site.kind in ("row", "reduce")]
                if len(rows) > 1:
                    rows[-1].skip("mutant: rank 1 decides otherwise")
            return orig(work, plans, config, ctx)
        return _rewrite
    _wrap(pipeline, "_rewrite", make)


@mutant("piece boundaries: every rank hands the next rank's rows of a boundary value over",
        "test_piecewise_vllm_compile.py::test_piecewise_boundary_contract_alone_is_exact_and_its_mutant_is_caught")
def boundary_rows_of_the_next_rank():
    from fxpasses.testing import piecewise
    cm = piecewise.MUTANTS["boundary_rows_of_the_next_rank"]()
    cm.__enter__()
    _KEEP.append(cm)   # a collected generator would run its `finally` and undo the patch


@mutant("the token gate keeps every rewrite (its verdict ignored)", GATE)
def token_gate_keeps_everything():
    from fxpasses import token_gate
    orig = token_gate.judge

    def judge(*a, **k):
        v = orig(*a, **k)
        return token_gate.Verdict(True, v.token_range, v.points, v.costs, v.why)
    token_gate.judge = judge


@mutant("comm_volume counts a reduce-scatter as free", VOLUME, BYTES)
def reduce_scatter_counted_free():
    from fxpasses import comm_volume
    orig = comm_volume.collective_volumes

    def collective_volumes(*a, **k):
        return [v for v in orig(*a, **k) if v.kind != "reduce_scatter"]
    comm_volume.collective_volumes = collective_volumes
