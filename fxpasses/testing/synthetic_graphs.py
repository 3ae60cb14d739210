"""Synthetic post-grad graphs of real model sizes, without allocating a single weight.

Builds post-grad-style ATen graphs directly with torch.fx: the same node forms the real post-grad
graph has (masked VocabParallelEmbedding + `_c10d_functional.all_reduce_` / `wait_tensor`,
`vllm_ir.rms_norm` / `vllm_ir.fused_add_rms_norm.maybe_inplace`, `aten.mm` against
`aten.permute(w, [1, 0])` weight placeholders, rotary + decomposed SDPA (bmm/softmax) per layer,
SiluAndMul as slice/neg/exp/div/mul), `nn_module_stack` on every node exactly as Dynamo writes it
(`{key: ("L['self'].layers[0].self_attn.o_proj", RowParallelLinear)}`), and FakeTensor
`meta["val"]` under one FakeTensorMode + ShapeEnv with a symbolic token count (a `Sym(s0)`
placeholder and token tensors of size s0). Weights are FakeTensors: nothing is allocated.

`build_graph(MODELS["llama70b-8"], tp=8)` is the graph one TP rank would hand to the custom pass
(vanilla TP); `tp_context(tp)` is a matching rank-0 `TPContext` that runs no collective. Used by
the pass-cost and communication-volume benchmarks (`tools/`) and by the tests.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.utils._pytree import tree_map

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
GROUP = "0"  # the c10d group name written into the synthetic graphs


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    mla: bool = False          # DeepSeek MLA attention (q_a/kv_a replicated, q_b/kv_b column)
    q_lora: int = 1536
    kv_lora: int = 512
    rope_dim: int = 64
    nope_dim: int = 128
    v_head_dim: int = 128

    def cut(self, layers: int) -> "ModelShape":
        from dataclasses import replace
        return replace(self, name=f"{self.name.split('-')[0]}-{layers}L", layers=layers)


LLAMA3_70B = ModelShape("llama70b", 80, 8192, 64, 8, 128, 28672, 128256)
DEEPSEEK_V3_DENSE = ModelShape("deepseekv3dense", 61, 7168, 128, 128, 128, 18432, 129280, mla=True)

MODELS = {  # the presets by name (`--models` of the benchmarks)
    "llama70b": LLAMA3_70B,
    "llama70b-8": LLAMA3_70B.cut(8),
    "deepseekv3dense": DEEPSEEK_V3_DENSE,
    "deepseekv3dense-8": DEEPSEEK_V3_DENSE.cut(8),
}


def _vllm_classes():
    """The real vLLM layer classes (as Dynamo records them). Where vLLM is not installed at all (the
    benchmarks run without it), class-name stand-ins; where it is installed but its layers cannot be
    imported, a loud error: a silent switch to the stand-in form would test another graph than claimed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return dict(row="RowParallelLinear", qkv="QKVParallelLinear", merged="MergedColumnParallelLinear",
                    column="ColumnParallelLinear", replicated="ReplicatedLinear",
                    embed="VocabParallelEmbedding", norm="RMSNorm", vllm_ir=False)
    try:
        import vllm.ir.ops  # noqa: F401  (registers torch.ops.vllm_ir.*)
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                                       ReplicatedLinear, RowParallelLinear,
                                                       ColumnParallelLinear)
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    except Exception as e:
        raise RuntimeError(f"vLLM is installed but its layer classes cannot be imported ({type(e).__name__}: "
                           f"{e}); the synthetic graphs would not have vLLM's form. Fix the vLLM install, or "
                           f"run in an environment without vLLM to get the class-name stand-ins.") from e
    return dict(row=RowParallelLinear, qkv=QKVParallelLinear, merged=MergedColumnParallelLinear,
                column=ColumnParallelLinear, replicated=ReplicatedLinear, embed=VocabParallelEmbedding,
                norm=RMSNorm, vllm_ir=True)


class FakeGraphBuilder:
    """Emit fx nodes whose meta["val"] are FakeTensors computed by running the op in fake mode."""

    def __init__(self, dtype=torch.bfloat16, example_tokens: int = 64):
        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env)
        self.graph = fx.Graph()
        self.dtype = dtype
        self.stack: dict = {}
        ids = torch.zeros(example_tokens, dtype=torch.long)
        ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC], constraint_sizes=[None])
        fake_ids = self.mode.from_tensor(ids, symbolic_context=ctx)
        self.T = fake_ids.shape[0]
        self.T_node = self._ph("arg0_1", self.T)
        self.n_ph = 1
        self.ids = self._ph("arg1_1", fake_ids)
        with self.mode:
            pos = torch.empty(self.T, dtype=torch.long)
        self.positions = self._ph("arg2_1", pos)
        self.n_ph = 3

    def _ph(self, name, v):
        n = self.graph.placeholder(name)
        n.meta["val"] = v
        return n

    def weight(self, *shape, dtype=None) -> fx.Node:
        self.n_ph += 1
        with self.mode:
            v = torch.empty(*shape, dtype=dtype or self.dtype)
        return self._ph(f"arg{self.n_ph}_1", v)

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        vals = tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, (args, kwargs))
        with self.mode:
            out = target(*vals[0], **vals[1])
        n = self.graph.call_function(target, args, kwargs)
        n.meta["val"] = out
        if self.stack:
            n.meta["nn_module_stack"] = dict(self.stack)
        return n

    def module(self, path: str, cls):
        """Context manager: nodes created inside carry this module on their nn_module_stack."""
        b = self

        class _M:
            def __enter__(self_):
                key = "L__self___" + path.replace(".", "_").replace("[", "_").replace("]", "")
                self_.key = key
                b.stack[key] = (f"L['self'].{path}", cls)

            def __exit__(self_, *exc):
                b.stack.pop(self_.key)
        return _M()

    def output(self, *vals):
        self.graph.output(tuple(vals))
        return fx.GraphModule(torch.nn.Module(), self.graph)


def _linear(b: FakeGraphBuilder, x, w):
    return b(aten.mm.default, x, b(aten.permute.default, w, [1, 0]))


def _all_reduce(b: FakeGraphBuilder, x):
    ar = b(c10d.all_reduce_.default, x, "sum", GROUP)
    return b(c10d.wait_tensor.default, ar)


def _rms_norm(b, cls, path, x, residual, hidden, eps=1e-5):
    w = b.weight(hidden)
    with b.module(path, cls):
        if b.vllm_ir:
            if residual is None:
                return b(torch.ops.vllm_ir.rms_norm.default, x, w, eps), x
            r = b(torch.ops.vllm_ir.fused_add_rms_norm.maybe_inplace, x, residual, w, eps)
            return b(operator.getitem, r, 0), b(operator.getitem, r, 1)
        if residual is not None:
            x = b(aten.add.Tensor, x, residual)
        res = x
        var = b(aten.mean.dim, b(aten.pow.Tensor_Scalar, x, 2), [-1], True)
        y = b(aten.mul.Tensor, x, b(aten.rsqrt.default, b(aten.add.Tensor, var, eps)))
        return b(aten.mul.Tensor, y, w), res


def _rope(b, x, cos, sin, nheads, dim):
    """Neox rotary on x [T, nheads, dim] as the decomposed post-grad graph has it."""
    half = dim // 2
    x1 = b(aten.slice.Tensor, x, 2, 0, half)
    x2 = b(aten.slice.Tensor, x, 2, half, dim)
    c = b(aten.unsqueeze.default, cos, 1)
    s = b(aten.unsqueeze.default, sin, 1)
    o1 = b(aten.sub.Tensor, b(aten.mul.Tensor, x1, c), b(aten.mul.Tensor, x2, s))
    o2 = b(aten.add.Tensor, b(aten.mul.Tensor, x2, c), b(aten.mul.Tensor, x1, s))
    return b(aten.cat.default, [o1, o2], -1)


def _sdpa(b, q, k, v, nh, qk_dim, v_dim, scale):
    """Causal SDPA decomposed as in the real post-grad graph: q/k/v [T, nh, d] -> [T, nh*v_dim]."""
    T = b.T_node
    qt = b(aten.expand.default, b(aten.mul.Scalar, b(aten.permute.default, q, [1, 0, 2]), scale), [nh, T, qk_dim])
    kt = b(aten.permute.default, k, [1, 2, 0])
    kt = b(aten.expand.default, b(aten.mul.Scalar, kt, scale), [nh, qk_dim, T])
    s = b(aten.bmm.default, qt, kt)
    i1 = b(aten.unsqueeze.default, b(torch.ops.prims.iota.default, T, start=0, step=1, dtype=torch.int64,
                                     device=torch.device("cpu"), requires_grad=False), -2)
    i2 = b(aten.unsqueeze.default, b(torch.ops.prims.iota.default, T, start=0, step=1, dtype=torch.int64,
                                     device=torch.device("cpu"), requires_grad=False), -1)
    mask = b(aten.le.Scalar, b(aten.sub.Tensor, i1, i2), 0)
    zero = b(aten.full.default, [], 0.0, dtype=b.dtype, device=torch.device("cpu"), pin_memory=False)
    ninf = b(aten.full.default, [], float("-inf"), dtype=b.dtype, device=torch.device("cpu"), pin_memory=False)
    s = b(aten.add.Tensor, s, b(aten.where.self, mask, zero, ninf))
    mx = b(aten.amax.default, s, [-1], True)
    e = b(aten.exp.default, b(aten.sub.Tensor, s, mx))
    p = b(aten.div.Tensor, e, b(aten.sum.dim_IntList, e, [-1], True))
    vt = b(aten.expand.default, b(aten.permute.default, v, [1, 0, 2]), [nh, T, v_dim])
    o = b(aten.bmm.default, p, vt)
    o = b(aten.clone.default, b(aten.permute.default, o, [1, 0, 2]), memory_format=torch.contiguous_format)
    return b(aten.view.default, o, [T, nh * v_dim])


def build_graph(m: ModelShape, tp: int, dtype=torch.bfloat16) -> fx.GraphModule:
    """The post-grad graph one TP rank of `m` would hand to the custom pass (vanilla TP)."""
    cls = _vllm_classes()
    b = FakeGraphBuilder(dtype)
    b.vllm_ir = cls["vllm_ir"]
    T = b.T_node
    H = m.hidden
    # ---- embedding (VocabParallelEmbedding: masked lookup + all-reduce) ----
    vloc = m.vocab // tp
    w_emb = b.weight(vloc, H)
    with b.module("embed_tokens", cls["embed"]):
        ids = b.ids
        inside = b(aten.bitwise_and.Tensor, b(aten.ge.Scalar, ids, 0), b(aten.lt.Scalar, ids, vloc))
        idx = b(aten.mul.Tensor, inside, ids)
        emb = b(aten.embedding.default, w_emb, idx)
        masked = b(aten.unsqueeze.default, b(aten.bitwise_not.default, inside), -1)
        zero = b(aten.full.default, [], 0.0, dtype=dtype, device=torch.device("cpu"), pin_memory=False)
        x = _all_reduce(b, b(aten.where.self, masked, zero, emb))
    # rotary cos/sin cache lookup, shared by all layers
    rd = m.rope_dim if m.mla else m.head_dim
    cache = b.weight(4096, rd)
    cs = b(aten.index_select.default, cache, 0, b.positions)
    cos = b(aten.slice.Tensor, cs, 1, 0, rd // 2)
    sin = b(aten.slice.Tensor, cs, 1, rd // 2, rd)
    residual = None
    nh = m.heads // tp
    nkv = max(m.kv_heads // tp, 1)
    for i in range(m.layers):
        L = f"layers[{i}]"
        with b.module(L, "LlamaDecoderLayer" if not m.mla else "DeepseekV2DecoderLayer"):
            h, residual = _rms_norm(b, cls["norm"], f"{L}.input_layernorm", x, residual, H)
            with b.module(f"{L}.self_attn", "LlamaAttention" if not m.mla else "DeepseekV2MLAAttention"):
                if not m.mla:
                    hd = m.head_dim
                    wqkv = b.weight((nh + 2 * nkv) * hd, H)
                    with b.module(f"{L}.self_attn.qkv_proj", cls["qkv"]):
                        qkv = _linear(b, h, wqkv)
                    sp = b(aten.split_with_sizes.default, qkv, [nh * hd, nkv * hd, nkv * hd], -1)
                    q, k, v = (b(operator.getitem, sp, j) for j in range(3))
                    q = b(aten.view.default, q, [T, nh, hd])
                    k = b(aten.view.default, k, [T, nkv, hd])
                    v = b(aten.view.default, v, [T, nkv, hd])
                    q = _rope(b, q, cos, sin, nh, hd)
                    k = _rope(b, k, cos, sin, nkv, hd)
                    if nkv != nh:  # GQA: repeat kv heads
                        rep = nh // nkv
                        k = b(aten.view.default, b(aten.clone.default, b(aten.expand.default, b(
                            aten.unsqueeze.default, k, 2), [T, nkv, rep, hd]), memory_format=torch.contiguous_format),
                            [T, nh, hd])
                        v = b(aten.view.default, b(aten.clone.default, b(aten.expand.default, b(
                            aten.unsqueeze.default, v, 2), [T, nkv, rep, hd]), memory_format=torch.contiguous_format),
                            [T, nh, hd])
                    attn = _sdpa(b, q, k, v, nh, hd, hd, hd ** -0.25)
                    o_in = nh * hd
                else:
                    qk = m.nope_dim + m.rope_dim
                    wa = b.weight(m.q_lora + m.kv_lora + m.rope_dim, H)
                    with b.module(f"{L}.self_attn.fused_qkv_a_proj", cls["replicated"]):
                        qkv_a = _linear(b, h, wa)
                    sp = b(aten.split_with_sizes.default, qkv_a, [m.q_lora, m.kv_lora, m.rope_dim], -1)
                    qa, kva, kpe = (b(operator.getitem, sp, j) for j in range(3))
                    qa, _ = _rms_norm(b, cls["norm"], f"{L}.self_attn.q_a_layernorm", qa, None, m.q_lora)
                    kva, _ = _rms_norm(b, cls["norm"], f"{L}.self_attn.kv_a_layernorm", kva, None, m.kv_lora)
                    wqb = b.weight(nh * qk, m.q_lora)
                    with b.module(f"{L}.self_attn.q_b_proj", cls["column"]):
                        q = _linear(b, qa, wqb)
                    wkvb = b.weight(nh * (m.nope_dim + m.v_head_dim), m.kv_lora)
                    with b.module(f"{L}.self_attn.kv_b_proj", cls["column"]):
                        kv = _linear(b, kva, wkvb)
                    q = b(aten.view.default, q, [T, nh, qk])
                    qs = b(aten.split_with_sizes.default, q, [m.nope_dim, m.rope_dim], -1)
                    qn, qp = b(operator.getitem, qs, 0), b(operator.getitem, qs, 1)
                    qp = _rope(b, qp, cos, sin, nh, m.rope_dim)
                    q = b(aten.cat.default, [qn, qp], -1)
                    kv = b(aten.view.default, kv, [T, nh, m.nope_dim + m.v_head_dim])
                    kvs = b(aten.split_with_sizes.default, kv, [m.nope_dim, m.v_head_dim], -1)
                    kn, v = b(operator.getitem, kvs, 0), b(operator.getitem, kvs, 1)
                    kp = b(aten.unsqueeze.default, kpe, 1)
                    kp = _rope(b, kp, cos, sin, 1, m.rope_dim)
                    kp = b(aten.expand.default, kp, [T, nh, m.rope_dim])
                    k = b(aten.cat.default, [kn, kp], -1)
                    attn = _sdpa(b, q, k, v, nh, qk, m.v_head_dim, qk ** -0.25)
                    o_in = nh * m.v_head_dim
                wo = b.weight(H, o_in)
                with b.module(f"{L}.self_attn.o_proj", cls["row"]):
                    x = _all_reduce(b, _linear(b, attn, wo))
            h, residual = _rms_norm(b, cls["norm"], f"{L}.post_attention_layernorm", x, residual, H)
            with b.module(f"{L}.mlp", "LlamaMLP"):
                iloc = m.intermediate // tp
                wgu = b.weight(2 * iloc, H)
                with b.module(f"{L}.mlp.gate_up_proj", cls["merged"]):
                    gu = _linear(b, h, wgu)
                with b.module(f"{L}.mlp.act_fn", "SiluAndMul"):
                    g = b(aten.slice.Tensor, gu, 1, 0, iloc)
                    sg = b(aten.div.Tensor, g, b(aten.add.Tensor, b(aten.exp.default, b(aten.neg.default, g)), 1))
                    a = b(aten.mul.Tensor, sg, b(aten.slice.Tensor, gu, 1, iloc, 2 * iloc))
                wd = b.weight(H, iloc)
                with b.module(f"{L}.mlp.down_proj", cls["row"]):
                    x = _all_reduce(b, _linear(b, a, wd))
    h, _ = _rms_norm(b, cls["norm"], "norm", x, residual, H)
    return b.output(h)


def tp_context(tp: int):
    """Rank 0 of a TP group of `tp` named GROUP, as the synthetic graphs' collectives name it."""
    from fxpasses.context import GroupRef, TPContext
    return TPContext(tp=tp, rank=0, global_rank=0, world=tp,
                     tp_group=GroupRef(tuple(range(tp)), GROUP, None, "tp"))

