"""Ascend NPU op forms: the custom ops vllm-ascend and torch_npu put into traced graphs.

Data only (interpreted by `fxpasses.op_forms`). Schemas as read from the sources (vllm-ascend
main of 2026-08-22 `vllm_ascend/ops/register_custom_ops.py`, `ops/linear.py`, `csrc/torch_binding.cpp`,
`ops/triton/...`; torch_npu's op-plugin `op_plugin/config/op_plugin_functions.yaml` of 2026-08-21);
argument names below are the schemas' own.

vllm-ascend's `GraphFusionPassManager` runs its default fusions before any pass added under its key
(fxpasses among them), in this order, each on by default in `ascend_compilation_config`:
`fuse_norm_quant` (AddRMSNormQuantFusionPass: `npu_add_rms_norm` / `_C_ascend.npu_add_rms_norm_bias`
followed by `vllm.quantize` or `npu_dynamic_quant` -> `npu_add_rms_norm_quant` /
`npu_add_rms_norm_dynamic_quant`; bf16/fp16 models, not on 310P), `fuse_qknorm_rope`
(QKNormRopeFusionPass: split + per-head `npu_rms_norm` of q and k + `npu_rotary_embedding` ->
`vllm.qkv_rmsnorm_rope`; bf16, head size 128), `fuse_muls_add` (MulsAddFusionPass: `x * scale + y`
-> `vllm.muls_add`, scale the model's `routed_scaling_factor`). So the graph fxpasses receives holds
their outputs, declared below; `fxpasses.testing.ascend_fusions` re-enacts them on stand-in graphs. The TP all-reduce and vLLM's reduce_scatter / all_gather ops
(`vllm::all_reduce(Tensor tensor, str group_name)`, ...) are vLLM's and known to
`fxpasses.graph_forms` already.

What the MoE communication ops mean here. `vllm::maybe_pad_and_reduce(Tensor x) -> Tensor` ends
an MoE block. vllm-ascend decides at run time what it does and its fake kernel records the
decision in the traced shape: same rows = `tensor_model_parallel_all_reduce(x)` (vllm-ascend before
Aug 2026 with its FlashComm1 off): a TP all-reduce, a reduce site FlashComm1 turns into pad +
reduce_scatter like any other; fewer rows = pad + reduce_scatter over dim 0 (the EP group now, the
TP group with the old FlashComm1): the graph is already sequence parallel there, left alone and
counted. (Now a VL draft model's call all-reduces while its fake kernel states fewer rows: such a
node is counted as the reduce_scatter its shape says, and left alone.) `vllm::maybe_all_gather_and_maybe_unpad(Tensor x) -> Tensor` is its twin before the
experts: more rows = all_gather (+ unpad), a collective that is not token-wise; same rows = the
identity (FlashComm off), token-wise. Both name no group: the all-reduce is TP's; the
reduce-scatter / all-gather run on the EP group (= TP at DP=1), and their bytes are counted with
the TP size. (Before Aug 2026 their schemas were `(Tensor x, bool is_ep_comm=False)` and
`(Tensor x, bool label, bool is_ep_comm=False)`; the records name only `x`, so both fit.)
"""
from fxpasses.op_forms import Collective, Matmul, TokenWise

PLATFORM = "npu"

#: Ascend's private weight layout; vllm-ascend never converts float32 weights to it
_NZ = dict(private_format="NZ (ACL_FORMAT_FRACTAL_NZ)", never_private=("float32",))

FORMS = (
    # norms: (y, rstd) / (y, rstd, x1 + x2); rstd is [T, 1] for a [T, H] input, token-major too
    TokenWise("npu::npu_rms_norm", args=("self",),
              note="npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)"),
    TokenWise("npu::npu_add_rms_norm", args=("x1", "x2"),
              note="npu_add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) "
                   "-> (Tensor, Tensor, Tensor): (y, rstd, x1 + x2)"),
    TokenWise("_C_ascend::npu_add_rms_norm_bias", args=("x1", "x2"),
              note="vllm-ascend custom op: npu_add_rms_norm_bias(Tensor x1, Tensor x2, Tensor gamma, "
                   "Tensor? beta=None, float epsilon=1e-6) -> (Tensor y, Tensor rstd, Tensor x)"),
    # activation: silu(first half) * second half along `dim`
    TokenWise("npu::npu_swiglu", args=("self",), dim_arg="dim", dim_default=-1,
              note="npu_swiglu(Tensor self, int dim=-1) -> Tensor"),
    # rotary embedding: positions [T], query/key [T, heads * head_size]; all three together
    TokenWise("vllm::npu_rotary_embedding", args=("positions", "query", "key"), all_args=True,
              note="vllm-ascend op (rope_forward_oot): npu_rotary_embedding(Tensor positions, Tensor query, "
                   "Tensor key, Tensor cos_sin_cache, SymInt head_size, SymInt rotary_dim, bool is_neox_style, "
                   "Tensor? offsets=None) -> (Tensor, Tensor)"),
    # W8A8 activation quantisation: static (per-tensor scale repeated over the features) and dynamic
    # (per token: int8 values and a [T] scale, both token-major)
    TokenWise("vllm::quantize", args=("in_tensor",), quantizes=True,
              channel_args=("input_scale", "input_scale_reciprocal", "input_offset"),
              note="vllm-ascend op wrapping npu_quantize(div_mode=False): quantize(Tensor in_tensor, "
                   "Tensor input_scale, Tensor input_scale_reciprocal, Tensor input_offset) -> Tensor (int8)"),
    TokenWise("npu::npu_dynamic_quant", args=("input",), quantizes=True, channel_args=("smooth_scales",),
              note="npu_dynamic_quant(Tensor input, *, Tensor? smooth_scales=None, Tensor? group_index=None, "
                   "int? dst_type=None, str quant_mode=\"pertoken\", float dst_type_max=0.0) -> (Tensor, Tensor): "
                   "int8 values and per-token scale"),
    # vllm-ascend's default graph fusions (GraphFusionPassManager, run before fxpasses; see the module
    # docstring): a residual add + RMS norm fused with the next linear's activation quantisation, q/k
    # norm + rope, and the MoE's scaled add. Token-wise on their token arguments; the quantising ones
    # output int8 values (and per-token scales) beside the float residual sum
    TokenWise("npu::npu_add_rms_norm_quant", args=("x1", "x2"), quantizes=True,
              note="npu_add_rms_norm_quant(Tensor x1, Tensor x2, Tensor gamma, Tensor scales1, Tensor? zero_points1, "
                   "Tensor? beta=None, Tensor? scales2=None, Tensor? zero_points2=None, *, int axis=-1, "
                   "float epsilon=1e-06, bool div_mode=True, int? dst_type=None) -> (Tensor, Tensor, Tensor): "
                   "(int8 y1, y2, x1 + x2); AddRMSNormQuantFusionPass, W8A8 static"),
    TokenWise("npu::npu_add_rms_norm_dynamic_quant", args=("x1", "x2"), quantizes=True,
              note="npu_add_rms_norm_dynamic_quant(Tensor x1, Tensor x2, Tensor gamma, *, Tensor? smooth_scale1=None, "
                   "Tensor? smooth_scale2=None, Tensor? beta=None, float epsilon=1e-6, bool[2]? output_mask=None, "
                   "int? y_dtype=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor): (int8 y1, y2, x1 + x2, "
                   "per-token scale1, scale2); AddRMSNormQuantFusionPass, W8A8 dynamic"),
    TokenWise("vllm::qkv_rmsnorm_rope", args=("input", "positions"), all_args=True,
              note="vllm-ascend op (split_qkv_rmsnorm_rope, Triton): qkv_rmsnorm_rope(Tensor input, "
                   "Tensor cos_sin_cache, Tensor positions, Tensor q_weight, Tensor k_weight, SymInt q_hidden_size, "
                   "SymInt kv_hidden_size, SymInt head_dim, float eps, Tensor? q_bias=None, Tensor? k_bias=None) "
                   "-> (Tensor, Tensor, Tensor): q, k normed and rotated, v; QKNormRopeFusionPass"),
    TokenWise("vllm::muls_add", args=("x", "y"),
              note="vllm-ascend op (Triton): muls_add(Tensor x, Tensor y, float scale) -> Tensor: x * scale + y "
                   "(the MoE's routed_scaling_factor); MulsAddFusionPass"),
    # matmuls
    Matmul("vllm::unquantized_gemm", x="x", weight="weight", bias="bias", weight_layout="out_in", **_NZ,
           note="vllm-ascend op: unquantized_gemm(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor "
                "(F.linear; the weight is NZ when weight_nz_mode=2, ND with the default 1 for bf16/fp16)"),
    Matmul("npu::npu_quant_matmul", x="x1", weight="x2", bias="bias", token_args=("pertoken_scale",),
           weight_layout="in_out", quantized=True, channel_args=("scale",), offset="offset", **_NZ,
           note="npu_quant_matmul(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, "
                "Tensor? pertoken_scale=None, Tensor? bias=None, int? output_dtype=None, int? x1_dtype=None, "
                "int? x2_dtype=None, int? pertoken_scale_dtype=None, int? scale_dtype=None, int[]? group_sizes=None, "
                "Tensor? y_scale=None) -> Tensor; "
                "x2 is the int8 weight transposed to [in, out], NZ unless weight_nz_mode=0"),
    # MoE communication (see the module docstring)
    Collective("vllm::maybe_pad_and_reduce", input="x", same_rows="all_reduce", other_rows="reduce_scatter",
               note="vllm-ascend op: maybe_pad_and_reduce(Tensor x) -> Tensor"),
    Collective("vllm::maybe_all_gather_and_maybe_unpad", input="x", same_rows=None, other_rows="all_gather",
               note="vllm-ascend op: maybe_all_gather_and_maybe_unpad(Tensor x) -> Tensor"),
)
