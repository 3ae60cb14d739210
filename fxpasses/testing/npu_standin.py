"""Stand-ins for the Ascend NPU ops (test support only): the real namespaces, names and schemas,
defined with `torch.library`, each with a fake (meta) kernel and a CPU reference kernel.

torch_npu needs CANN and vllm_ascend cannot be imported on a CPU machine, so graphs with the ops
vllm-ascend traces (`fxpasses.op_forms.npu`) are produced here from stand-ins: a model calling
`torch.ops.npu.npu_add_rms_norm(...)` traces to the very node a vllm-ascend graph holds, and runs
with the reference kernel below. Schemas as in the sources (vllm-ascend 2026-08, torch_npu
op-plugin); the vLLM ops vllm-ascend registers through `direct_register_custom_op` carry the
inferred schema (`SymInt` for int). Ops that already exist in this process (vLLM's own
`vllm::all_reduce`, `vllm::reduce_scatter`, `vllm::all_gather`, or an earlier definition) are
never redefined.

op-plugin types dtype arguments of newer kernels as `int?` (a c10 ScalarType code; torch_npu's
Python API also takes a torch.dtype there, which the dispatcher turns into that code): the kernels
below accept either (`as_dtype`).

Reference kernels: RMS norm (rstd in float32, as the NPU kernels return it), SwiGLU = silu(first
half) * second half along `dim`, rotary embedding in the neox (halves) and GPT-J (interleaved)
styles over vLLM's cos|sin cache, int8 quantisation with scale reciprocal and offset
(npu_quantize's div_mode=False), per-token dynamic int8 quantisation, the int8 matmul with its
dequant (`(x1 @ x2 [+ int32 bias]) * scale [* pertoken_scale] [+ float bias]`, accumulated exactly
in float64), and the MoE communication ops over vLLM's TP group (gloo here).

`SEQUENCE_PARALLEL` stands for vllm-ascend's runtime switch behind the MoE ops (its forward
context): False (FlashComm off) makes `maybe_pad_and_reduce` a TP all-reduce and
`maybe_all_gather_and_maybe_unpad` the identity; True makes them pad + reduce_scatter and
all_gather (no unpad: the stand-in's token counts are multiples of the group size) over TP. The
fake kernels read it at trace time, as vllm-ascend's read its forward context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxpasses.op_forms import as_dtype

SEQUENCE_PARALLEL = False

#: op -> schema (after the name), exactly as defined here
SCHEMAS = {
    "npu::npu_rms_norm": "(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
    "npu::npu_add_rms_norm": "(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor, Tensor)",
    "_C_ascend::npu_add_rms_norm_bias": ("(Tensor x1, Tensor x2, Tensor gamma, Tensor? beta=None, float epsilon=1e-6)"
                                         " -> (Tensor y, Tensor rstd, Tensor x)"),
    "npu::npu_swiglu": "(Tensor self, int dim=-1) -> Tensor",
    "vllm::npu_rotary_embedding": ("(Tensor positions, Tensor query, Tensor key, Tensor cos_sin_cache, SymInt head_size,"
                                   " SymInt rotary_dim, bool is_neox_style, Tensor? offsets=None) -> (Tensor, Tensor)"),
    "vllm::unquantized_gemm": "(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor",
    "vllm::quantize": ("(Tensor in_tensor, Tensor input_scale, Tensor input_scale_reciprocal, Tensor input_offset)"
                       " -> Tensor"),
    "npu::npu_quant_matmul": ("(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, Tensor? pertoken_scale=None,"
                              " Tensor? bias=None, int? output_dtype=None, int? x1_dtype=None, int? x2_dtype=None,"
                              " int? pertoken_scale_dtype=None, int? scale_dtype=None, int[]? group_sizes=None,"
                              " Tensor? y_scale=None) -> Tensor"),
    "npu::npu_dynamic_quant": ("(Tensor input, *, Tensor? smooth_scales=None, Tensor? group_index=None,"
                               " int? dst_type=None, str quant_mode=\"pertoken\", float dst_type_max=0.0)"
                               " -> (Tensor, Tensor)"),
    # vllm-ascend's default graph fusions emit these (fxpasses.testing.ascend_fusions)
    "npu::npu_add_rms_norm_quant": ("(Tensor x1, Tensor x2, Tensor gamma, Tensor scales1, Tensor? zero_points1,"
                                    " Tensor? beta=None, Tensor? scales2=None, Tensor? zero_points2=None, *,"
                                    " int axis=-1, float epsilon=1e-06, bool div_mode=True, int? dst_type=None)"
                                    " -> (Tensor, Tensor, Tensor)"),
    "npu::npu_add_rms_norm_dynamic_quant": ("(Tensor x1, Tensor x2, Tensor gamma, *, Tensor? smooth_scale1=None,"
                                            " Tensor? smooth_scale2=None, Tensor? beta=None, float epsilon=1e-6,"
                                            " bool[2]? output_mask=None, int? y_dtype=None)"
                                            " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"),
    "vllm::qkv_rmsnorm_rope": ("(Tensor input, Tensor cos_sin_cache, Tensor positions, Tensor q_weight,"
                               " Tensor k_weight, SymInt q_hidden_size, SymInt kv_hidden_size, SymInt head_dim,"
                               " float eps, Tensor? q_bias=None, Tensor? k_bias=None) -> (Tensor, Tensor, Tensor)"),
    "vllm::muls_add": "(Tensor x, Tensor y, float scale) -> Tensor",
    "vllm::maybe_pad_and_reduce": "(Tensor x) -> Tensor",
    "vllm::maybe_all_gather_and_maybe_unpad": "(Tensor x) -> Tensor",
}


# ---- reference kernels (CPU) and fake kernels ----------------------------------------------------

def _rstd(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    return torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)


def _rstd_fake(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    shape = list(x.shape[:x.dim() - gamma.dim()]) + [1] * gamma.dim()
    return x.new_empty(shape, dtype=torch.float32)


def rms_norm(x, gamma, epsilon=1e-6):
    r = _rstd(x, gamma, epsilon)
    return x * r * gamma, r.float()


def rms_norm_fake(x, gamma, epsilon=1e-6):
    return torch.empty_like(x), _rstd_fake(x, gamma)


def add_rms_norm(x1, x2, gamma, epsilon=1e-6):
    x = x1 + x2
    y, r = rms_norm(x, gamma, epsilon)
    return y, r, x


def add_rms_norm_fake(x1, x2, gamma, epsilon=1e-6):
    return torch.empty_like(x1), _rstd_fake(x1, gamma), torch.empty_like(x1)


def add_rms_norm_bias(x1, x2, gamma, beta=None, epsilon=1e-6):
    y, r, x = add_rms_norm(x1, x2, gamma, epsilon)
    return (y + beta if beta is not None else y), r, x


def add_rms_norm_bias_fake(x1, x2, gamma, beta=None, epsilon=1e-6):
    return add_rms_norm_fake(x1, x2, gamma, epsilon)


def swiglu(x, dim=-1):
    a, b = x.chunk(2, dim=dim)
    return F.silu(a) * b


def swiglu_fake(x, dim=-1):
    shape = list(x.shape)
    shape[dim] = shape[dim] // 2
    return x.new_empty(shape)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x [T, heads, rotary_dim]; cos/sin [T, 1, rotary_dim / 2]."""
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def rotary_embedding(positions, query, key, cos_sin_cache, head_size, rotary_dim, is_neox_style, offsets=None):
    if offsets is not None:
        raise NotImplementedError("batched rotary embedding (offsets) is not supported, as on the NPU")
    t = positions.shape[0]
    cos, sin = cos_sin_cache.index_select(0, positions).to(query.dtype).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    out = []
    for x in (query, key):
        x3 = x.reshape(t, -1, head_size)
        rot = _rotate(x3[..., :rotary_dim], cos, sin, is_neox_style)
        out.append(torch.cat([rot, x3[..., rotary_dim:]], dim=-1).reshape(x.shape))
    return out[0], out[1]


def rotary_embedding_fake(positions, query, key, cos_sin_cache, head_size, rotary_dim, is_neox_style, offsets=None):
    return torch.empty_like(query), torch.empty_like(key)


def unquantized_gemm(x, weight, bias=None):
    return F.linear(x, weight, bias)


def unquantized_gemm_fake(x, weight, bias=None):
    return x.new_empty(list(x.shape[:-1]) + [weight.shape[0]])


def quantize(in_tensor, input_scale, input_scale_reciprocal, input_offset):
    q = torch.round(in_tensor * input_scale_reciprocal.to(in_tensor.dtype) + input_offset.to(in_tensor.dtype))
    return q.clamp(-128, 127).to(torch.int8)


def quantize_fake(in_tensor, input_scale, input_scale_reciprocal, input_offset):
    return torch.empty_like(in_tensor, dtype=torch.int8)


def quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, **unused):
    output_dtype = as_dtype(output_dtype)
    if any(v is not None for v in unused.values()):
        raise NotImplementedError(f"the stand-in takes no {sorted(k for k, v in unused.items() if v is not None)}")
    if output_dtype is None or offset is not None:
        raise NotImplementedError("the stand-in dequantises to a floating output_dtype only (no int8 output)")
    acc = x1.to(torch.float64) @ x2.to(torch.float64)          # exact for int8 operands
    if bias is not None and not bias.is_floating_point():     # int32 bias joins the accumulator
        acc = acc + bias.to(torch.float64)
    out = acc * scale.to(torch.float64)
    if pertoken_scale is not None:
        out = out * pertoken_scale.to(torch.float64).unsqueeze(-1)
    if bias is not None and bias.is_floating_point():
        out = out + bias.to(torch.float64)
    return out.to(output_dtype)


def quant_matmul_fake(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, **unused):
    return x1.new_empty(list(x1.shape[:-1]) + [x2.shape[-1]], dtype=as_dtype(output_dtype) or torch.int8)


def dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                  dst_type_max=0.0):
    if group_index is not None or as_dtype(dst_type) not in (None, torch.int8) or quant_mode != "pertoken":
        raise NotImplementedError("the stand-in quantises per token to int8 only")
    x = input * smooth_scales.to(input.dtype) if smooth_scales is not None else input
    scale = (x.abs().amax(dim=-1) / 127.0).clamp_min(1e-12).float()
    q = torch.round(x / scale.to(x.dtype).unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return q, scale


def dynamic_quant_fake(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                       dst_type_max=0.0):
    return torch.empty_like(input, dtype=torch.int8), input.new_empty(input.shape[:-1], dtype=torch.float32)


# ---- the ops vllm-ascend's default graph fusions emit ----------------------------------------------

def add_rms_norm_quant(x1, x2, gamma, scales1, zero_points1, beta=None, scales2=None, zero_points2=None, *,
                       axis=-1, epsilon=1e-6, div_mode=True, dst_type=None):
    """(int8 y, unused second quantisation, x1 + x2): y = round(norm / scales1 + zero_points1) (div_mode)."""
    if scales2 is not None or zero_points2 is not None or not div_mode or as_dtype(dst_type) not in (None, torch.int8):
        raise NotImplementedError("the stand-in quantises once, in div_mode, to int8")
    y, _, x = add_rms_norm_bias(x1, x2, gamma, beta, epsilon)
    q = y / scales1.to(y.dtype)
    if zero_points1 is not None:
        q = q + zero_points1.to(y.dtype)
    q = torch.round(q).clamp(-128, 127).to(torch.int8)
    return q, torch.zeros_like(q), x


def add_rms_norm_quant_fake(x1, x2, gamma, scales1, zero_points1, beta=None, scales2=None, zero_points2=None, *,
                            axis=-1, epsilon=1e-6, div_mode=True, dst_type=None):
    return torch.empty_like(x1, dtype=torch.int8), torch.empty_like(x1, dtype=torch.int8), torch.empty_like(x1)


def add_rms_norm_dynamic_quant(x1, x2, gamma, *, smooth_scale1=None, smooth_scale2=None, beta=None, epsilon=1e-6,
                               output_mask=None, y_dtype=None):
    """(int8 y1, int8 y2, x1 + x2, per-token scale1, scale2); only the first quantisation (output_mask
    [True, False], as vllm-ascend's fusion asks)."""
    if smooth_scale2 is not None or (output_mask is not None and output_mask[1]):
        raise NotImplementedError("the stand-in computes the first quantisation only")
    y, _, x = add_rms_norm_bias(x1, x2, gamma, beta, epsilon)
    q, scale = dynamic_quant(y, smooth_scales=smooth_scale1)
    return q, torch.zeros_like(q), x, scale, torch.zeros_like(scale)


def add_rms_norm_dynamic_quant_fake(x1, x2, gamma, *, smooth_scale1=None, smooth_scale2=None, beta=None,
                                    epsilon=1e-6, output_mask=None, y_dtype=None):
    q = torch.empty_like(x1, dtype=torch.int8)
    s = x1.new_empty(x1.shape[:-1], dtype=torch.float32)
    return q, torch.empty_like(q), torch.empty_like(x1), s, torch.empty_like(s)


def qkv_rmsnorm_rope(input, cos_sin_cache, positions, q_weight, k_weight, q_hidden_size, kv_hidden_size, head_dim,
                     eps, q_bias=None, k_bias=None):
    """split [q | k | v], RMS norm per head of q and k (+ bias), neox rotary embedding of q and k."""
    q, k, v = input.split([q_hidden_size, kv_hidden_size, kv_hidden_size], dim=-1)
    t = input.shape[0]
    outs = []
    for x, w, b in ((q, q_weight, q_bias), (k, k_weight, k_bias)):
        y, _ = rms_norm(x.reshape(t, -1, head_dim), w, eps)
        if b is not None:
            y = y + b
        outs.append(y.reshape(t, -1))
    q, k = rotary_embedding(positions, outs[0], outs[1], cos_sin_cache, head_dim, head_dim, True)
    return q, k, v.contiguous()


def qkv_rmsnorm_rope_fake(input, cos_sin_cache, positions, q_weight, k_weight, q_hidden_size, kv_hidden_size,
                          head_dim, eps, q_bias=None, k_bias=None):
    t = input.shape[0]
    return (input.new_empty((t, q_hidden_size)), input.new_empty((t, kv_hidden_size)),
            input.new_empty((t, kv_hidden_size)))


def muls_add(x, y, scale):
    return x * scale + y


def muls_add_fake(x, y, scale):
    return torch.empty_like(x)


def _tp():
    from vllm.distributed.parallel_state import get_tp_group
    g = get_tp_group()
    return g.device_group, g.world_size


def _world_size() -> int:
    """The TP size the fake kernels shape the sequence-parallel forms with (vLLM's; tests without
    distributed state patch this function)."""
    from vllm.distributed import get_tensor_model_parallel_world_size
    return get_tensor_model_parallel_world_size()


def maybe_pad_and_reduce(x):
    group, n = _tp()
    if not SEQUENCE_PARALLEL:
        out = x.clone()
        torch.distributed.all_reduce(out, group=group)
        return out
    pad = (-x.shape[0]) % n
    xp = F.pad(x, [0, 0] * (x.dim() - 1) + [0, pad]).contiguous()
    out = xp.new_empty((xp.shape[0] // n, *xp.shape[1:]))
    torch.distributed.reduce_scatter_tensor(out, xp, group=group)
    return out


def maybe_pad_and_reduce_fake(x):
    if not SEQUENCE_PARALLEL:
        return torch.empty_like(x)
    n = _world_size()
    return x.new_empty(((x.shape[0] + n - 1) // n, *x.shape[1:]))


def maybe_all_gather_and_maybe_unpad(x):
    if not SEQUENCE_PARALLEL:
        return x.clone()
    group, n = _tp()
    out = x.new_empty((x.shape[0] * n, *x.shape[1:]))
    torch.distributed.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def maybe_all_gather_and_maybe_unpad_fake(x):
    if not SEQUENCE_PARALLEL:
        return torch.empty_like(x)
    return x.new_empty((x.shape[0] * _world_size(), *x.shape[1:]))


KERNELS = {
    "npu::npu_rms_norm": (rms_norm, rms_norm_fake),
    "npu::npu_add_rms_norm": (add_rms_norm, add_rms_norm_fake),
    "_C_ascend::npu_add_rms_norm_bias": (add_rms_norm_bias, add_rms_norm_bias_fake),
    "npu::npu_swiglu": (swiglu, swiglu_fake),
    "vllm::npu_rotary_embedding": (rotary_embedding, rotary_embedding_fake),
    "vllm::unquantized_gemm": (unquantized_gemm, unquantized_gemm_fake),
    "vllm::quantize": (quantize, quantize_fake),
    "npu::npu_quant_matmul": (quant_matmul, quant_matmul_fake),
    "npu::npu_dynamic_quant": (dynamic_quant, dynamic_quant_fake),
    "npu::npu_add_rms_norm_quant": (add_rms_norm_quant, add_rms_norm_quant_fake),
    "npu::npu_add_rms_norm_dynamic_quant": (add_rms_norm_dynamic_quant, add_rms_norm_dynamic_quant_fake),
    "vllm::qkv_rmsnorm_rope": (qkv_rmsnorm_rope, qkv_rmsnorm_rope_fake),
    "vllm::muls_add": (muls_add, muls_add_fake),
    "vllm::maybe_pad_and_reduce": (maybe_pad_and_reduce, maybe_pad_and_reduce_fake),
    "vllm::maybe_all_gather_and_maybe_unpad": (maybe_all_gather_and_maybe_unpad, maybe_all_gather_and_maybe_unpad_fake),
}

_LIBS: dict[str, torch.library.Library] = {}
_DEFINED: list[str] = []


def _exists(op: str) -> bool:
    ns, name = op.split("::")
    try:
        return hasattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        return False


def ensure_npu_standin_ops() -> list[str]:
    """Define every stand-in op this process lacks (idempotent); returns the ops defined here so far.
    vLLM's `_C` / `vllm` ops are loaded first, so an op vLLM (or anyone) defines is never replaced."""
    try:
        import vllm._custom_ops  # noqa: F401  (vLLM's ops and its `vllm` library)
        import vllm.distributed.parallel_state  # noqa: F401  (vllm::all_reduce, reduce_scatter, all_gather)
    except ImportError:  # pragma: no cover - vLLM is part of the test environment
        pass
    return define_standins(SCHEMAS, KERNELS, _LIBS, _DEFINED)


def define_standins(schemas: dict[str, str], kernels: dict, libs: dict[str, torch.library.Library],
                    defined: list[str]) -> list[str]:
    """Define each op of `schemas` ({"ns::name": "(args) -> out"}) that this process lacks, with its
    CPU reference kernel and fake kernel from `kernels` ({op: (real, fake)}); `libs` and `defined`
    are the caller's registries (the libraries must stay alive). Returns the ops defined so far."""
    for op, schema in schemas.items():
        if op in defined or _exists(op):
            continue
        ns, name = op.split("::")
        lib = libs.get(ns)
        if lib is None:
            lib = libs[ns] = torch.library.Library(ns, "FRAGMENT")  # noqa: TOR901 - test-only stand-ins
        real, fake = kernels[op]
        lib.define(name + schema)
        lib.impl(name, real, "CPU")
        torch.library.register_fake(op, fake, lib=lib)
        defined.append(op)
    return list(defined)
