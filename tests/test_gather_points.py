"""`fxpasses.gather_points`: the minimum cut of gathered bytes per token, on small traced graphs
with fake values (hand-computed row bytes).

The bfloat16 norm case is the one the node-by-node choice got wrong in vLLM's CPU engine: the
residual (bf16, 2H bytes a row) and the reduce-scatter output (bf16) are added and normed in
float32 (4H) and cast back to bf16 before the column matmul. Gathering the norm's bf16 output
costs 2H a row; gathering its two inputs costs 4H. The widening cast lured a greedy into the
second (1.30x the bytes of the all-reduce graph)."""
import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxpasses.gather_points import replicated_candidates

H = 64


def _traced(fn, *shapes_dtypes):
    gm = fx.symbolic_trace(fn)
    FakeTensorProp(gm).propagate(*[torch.zeros(s, dtype=d) for s, d in shapes_dtypes])
    return gm.graph


def _row_bytes(n):
    v = n.meta["val"]
    return v.element_size() * v[0].numel()


def _nodes(graph):
    return {n.name: n for n in graph.nodes}


def test_a_bf16_norm_is_gathered_once_at_its_bf16_output_not_at_its_two_inputs():
    def f(x, res, w):
        h = x.float() + res.float()
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        return torch.mm(normed, w), h.to(torch.bfloat16)

    g = _traced(f, ((8, H), torch.bfloat16), ((8, H), torch.bfloat16), ((H, H), torch.bfloat16))
    n = _nodes(g)
    mm = next(x for x in g.nodes if x.target is torch.mm)
    # h feeds the norm and the next layer's residual (sharded there): not a candidate; the norm's
    # chain feeds only the matmul (a demand)
    chain = [x for x in g.nodes if x.op in ("call_function", "call_method") and x.target is not torch.mm
             and x not in (n["add"], n["float_1"], n["float_2"], n["to_1"])]
    assert [x.name for x in chain] == ["pow_1", "mean", "add_1", "rsqrt", "mul", "to"]
    sharded = {n["x"], n["res"], n["float_1"], n["float_2"], n["add"], n["to_1"], *chain}
    early = replicated_candidates(g, set(chain), {mm}, sharded, (), _row_bytes)
    assert early == set(), early        # gathered at `to` (bf16, 2H) alone
    # h also needed whole elsewhere (a demand reads it): gathering h (4H) serves that demand and the
    # whole norm (4H, as much as x and res): the norm runs on all tokens from the gathered h, 4H in
    # all instead of 4H + 2H
    early = replicated_candidates(g, set(chain) | {n["add"], n["float_1"], n["float_2"]}, {mm, n["to_1"]},
                                  sharded, (), _row_bytes)
    assert early == set(chain), early


def test_a_widening_chain_runs_on_all_tokens_after_gathering_its_narrow_input():
    def f(ids, w):
        e = ids.float().unsqueeze(-1).expand(-1, 4, H).reshape(-1, 4 * H)   # [T, 4] -> [T, 4H]
        return torch.mm(e, w)

    g = _traced(f, ((8, 4), torch.float32), ((4 * H, 8), torch.float32))
    n = _nodes(g)
    mm = next(x for x in g.nodes if x.target is torch.mm)
    chain = {n["float_1"], n["unsqueeze"], n["expand"], n["reshape"]}
    early = replicated_candidates(g, chain, {mm}, {n["ids"], *chain}, (), _row_bytes)
    # one gather of 16 bytes a row (ids.float() and its unsqueeze tie: the one nearest the matmul)
    # instead of 1 KiB
    assert early == {n["expand"], n["reshape"]}


def test_a_tuple_is_never_gathered_and_forced_nodes_run_on_all_tokens():
    def f(x, w):
        a, b = torch.split(x, [H // 2, H // 2], dim=-1)
        return torch.mm(a + b, w)

    g = _traced(f, ((8, H), torch.float32), ((H // 2, H // 2), torch.float32))
    n = _nodes(g)
    mm = next(x for x in g.nodes if x.target is torch.mm)
    cands = {n["split"], n["getitem"], n["getitem_1"], n["add"]}
    early = replicated_candidates(g, cands, {mm}, {n["x"], *cands}, (), _row_bytes)
    assert early == set()                # add's output (H/2 floats) beats x (H floats); no tuple cut
    forced = replicated_candidates(g, cands, {mm}, {n["x"], *cands}, {n["add"]}, _row_bytes)
    assert forced == {n["add"]}  # add on all tokens: its two halves gathered (as many bytes as x)
