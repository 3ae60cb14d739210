"""Strategy advisor: rank TP communication strategies for a model and deployment by a simple cost
model (a MODEL ESTIMATE, not a measurement).

Per decoder layer and rank: bytes each collective sends (ring accounting, as
`fxpasses.comm_volume.analytic_layer_bytes`, which is checked against rewritten graphs by
tools/bench_comm_volume.py), time = sum over collectives of (steps x latency + bytes / bandwidth),
steps = 2(n-1) for all_reduce and n-1 for reduce_scatter / all_gather / all_to_all (`Link`); or, with
`KindLinks`, each collective kind's own fixed cost + bytes / bandwidth from `fxpasses.link_costs`
(a platform's constants, or those calibrated on a live group: what `min_tokens: auto` decides
with); weight memory
per rank of o_proj + qkv + MLP (FlashComm2 stores o_proj at 1/K instead of 1/tp: "store more,
send less"). Compute savings (FlashComm1 runs norms on T/tp rows) and overlap are not modelled.

int8 on the wire (`quant` = "w8a8" / "w8a8_dynamic", the model's linear inputs quantised to int8):
the collectives that feed a quantised linear send int8 (`int8_comm: auto`, the pass's default):
FlashComm1's column all-gathers ([T, H]), FlashComm2's o_proj all_to_all ([T, D/tp]),
MLP-TP's gate_up_proj all_gather ([B, H]) and OTP's o_proj all_to_all ([B, D]) at 1 byte per element instead of `dtype_bytes`; dynamic W8A8 also sends the float32 per-token scales,
4 bytes per token and chunk, in the same collective (`int8_row_bytes`). Same launches, fewer
bytes: it pays at every token count whenever the activations are wider than 1 byte (the
quantisation itself runs anyway; on FlashComm1's shards it even runs on T/tp rows). Both
variants (int8 and `int8_comm: off`) are listed. The vanilla all-reduces and the reduce-scatters
stay in the activation dtype (they carry matmul outputs).

Fused kernels (`fused_estimates`, the lowering of `fxpasses.lowering`): each matmul + collective
pair a platform fuses (npu: matmul-all-reduce, matmul-reduce-scatter, all-gather-matmul; cuda
symm_mem: the last two) overlaps its communication with its matmul: max(comm, matmul) + a fixed
overhead instead of comm + matmul. It pays once the shorter of the two exceeds the overhead
(prefill-sized token counts); at decode sizes it costs the overhead. The break-even token count is
reported per strategy. Bytes are unchanged (the fused kernel sends what its pair sent).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fxpasses.comm_volume import padded
from fxpasses.errors import FxPassesError
from fxpasses.link_costs import LinkCosts


class AdvisorError(FxPassesError, ValueError):
    """Bad advisor input; the message says what to change."""


@dataclass(frozen=True)
class ModelDims:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int        # q/k head dim (qkv weight)
    v_head_dim: int      # o_proj input per head: D = heads * v_head_dim
    intermediate: int    # dense MLP intermediate size
    dtype_bytes: int = 2

    @property
    def attn_out(self) -> int:
        return self.heads * self.v_head_dim


PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336),
    "llama3-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       head_dim=128, intermediate_size=28672),
    "qwen2.5-72b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        head_dim=128, intermediate_size=29568),
    # DeepSeek-V3: MLA (o_proj input 128 heads x v_head_dim 128), dense MLP size of the first layers
    "deepseek-v3": dict(model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        intermediate_size=18432),
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1, "fp8": 1, "int8": 1}


def dims_from_config(cfg: dict[str, Any], name: str = "model", dtype_bytes: int | None = None) -> ModelDims:
    if not isinstance(cfg, dict):
        raise AdvisorError("model config must be a JSON object (an HF config.json)")
    cfg = {**cfg, **cfg.get("text_config", {})} if isinstance(cfg.get("text_config"), dict) else cfg
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise AdvisorError(f"model config lacks {missing}; give an HF config.json of a decoder model "
                           f"or a preset ({', '.join(PRESETS)})")
    try:
        H, L, nh = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        inter = int(cfg["intermediate_size"])
        nkv = int(cfg.get("num_key_value_heads") or nh)
        if min(H, L, nh, inter, nkv) <= 0:
            bad = [k for k, v in (("hidden_size", H), ("num_hidden_layers", L), ("num_attention_heads", nh),
                                  ("intermediate_size", inter), ("num_key_value_heads", nkv)) if v <= 0]
            raise AdvisorError(f"model config {bad[0]} must be positive")
        if "qk_nope_head_dim" in cfg:  # MLA
            hd = int(cfg["qk_nope_head_dim"]) + int(cfg.get("qk_rope_head_dim", 0))
            vhd = int(cfg.get("v_head_dim", cfg["qk_nope_head_dim"]))
        else:
            hd = int(cfg.get("head_dim") or H // nh)
            vhd = hd
    except (TypeError, ValueError) as e:
        raise AdvisorError(f"model config has a non-integer size: {e}") from None
    for k, v in (("hidden_size", H), ("num_hidden_layers", L), ("num_attention_heads", nh),
                 ("intermediate_size", inter), ("num_key_value_heads", nkv)):
        if v <= 0:
            raise AdvisorError(f"model config {k}={v} must be positive")
    if dtype_bytes is None:
        dtype_bytes = DTYPE_BYTES.get(str(cfg.get("torch_dtype", "bfloat16")), 2)
    return ModelDims(name, H, L, nh, nkv, hd, vhd, inter, dtype_bytes)


def load_model(spec: str, dtype_bytes: int | None = None) -> ModelDims:
    """A preset name or a path to an HF config.json."""
    key = spec.lower()
    if key in PRESETS:
        return dims_from_config(PRESETS[key], key, dtype_bytes)
    p = Path(spec)
    if not p.exists():
        raise AdvisorError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config.json")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AdvisorError(f"{spec} is not valid JSON: {e}") from None
    return dims_from_config(cfg, p.parent.name or p.stem, dtype_bytes)


@dataclass(frozen=True)
class Link:
    """One link for every collective kind: `latency_us` per ring step, `bandwidth_gbps` for the bytes."""

    bandwidth_gbps: float = 100.0   # GB/s per rank, each direction (bytes, not bits)
    latency_us: float = 10.0        # per collective step

    def time_us(self, steps: int, nbytes: float) -> float:
        return steps * self.latency_us + nbytes / (self.bandwidth_gbps * 1e3)

    def collective_us(self, kind: str, n: int, nbytes: float) -> float:
        return self.time_us(_steps(kind, n), nbytes)

    def describe(self) -> str:
        return f"link {self.bandwidth_gbps:g} GB/s, {self.latency_us:g} us/step"


@dataclass(frozen=True)
class KindLinks:
    """The `min_tokens: auto` gate's constants (`fxpasses.link_costs.LinkCosts`: a platform's fixed
    ones, or those `fxpasses.link_calibration` measured on a live group): each collective kind its
    own fixed cost per collective and bandwidth, so the advisor ranks with the numbers the pass
    decides with."""

    costs: LinkCosts

    @property
    def bandwidth_gbps(self) -> float:
        return min(link.gbps for link in self.costs.links.values())

    @property
    def latency_us(self) -> float:
        return min(link.latency_us for link in self.costs.links.values())

    def collective_us(self, kind: str, n: int, nbytes: float) -> float:
        return self.costs.link(kind).time_us(nbytes)

    def describe(self) -> str:
        per = ", ".join(f"{k} {v.latency_us:g} us + {v.gbps:g} GB/s" for k, v in self.costs.links.items())
        return f"{self.costs.platform} link costs ({self.costs.source}): {per}"


@dataclass
class Estimate:
    strategy: str
    comm_us_per_layer: float
    bytes_per_layer: int
    weight_bytes_per_layer: int
    collectives: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, group size, bytes)
    why: str = ""
    valid: bool = True

    def total_comm_ms(self, layers: int) -> float:
        return self.comm_us_per_layer * layers / 1e3


def _steps(kind: str, n: int) -> int:
    return 2 * (n - 1) if kind == "all_reduce" else (n - 1)


def _ring(kind: str, full: int, n: int) -> int:
    return 2 * (n - 1) * full // n if kind == "all_reduce" else (n - 1) * full // n


def validate(m: ModelDims, tp: int, tokens: int, link: "Link | KindLinks", k: int | None = None, dp: int = 1) -> None:
    if not isinstance(tp, int) or tp < 2:
        raise AdvisorError(f"tp={tp}: the strategies rewrite tensor-parallel communication, tp must be >= 2")
    if not isinstance(tokens, int) or tokens < 1:
        raise AdvisorError(f"tokens={tokens} must be a positive integer (tokens per step on one TP group)")
    if not link.bandwidth_gbps > 0:
        raise AdvisorError(f"bandwidth={link.bandwidth_gbps} GB/s must be positive")
    if not link.latency_us >= 0:
        raise AdvisorError(f"latency={link.latency_us} us must be >= 0")
    if m.heads % tp:
        raise AdvisorError(f"{m.name}: {m.heads} attention heads cannot be split over tp={tp}")
    if m.intermediate % tp:
        raise AdvisorError(f"{m.name}: intermediate_size {m.intermediate} is not divisible by tp={tp}")
    if k is not None and (k < 1 or k >= tp or tp % k):
        raise AdvisorError(f"K={k}: FlashComm2's o_proj TP size must satisfy 1 <= K < tp and divide tp={tp}")
    if dp < 1:
        raise AdvisorError(f"dp={dp} must be >= 1")


QUANTS = ("none", "w8a8", "w8a8_dynamic")
SCALE_BYTES = 4   # a dynamic per-token scale is float32, sent as 4 more int8 columns of the same row


def int8_row_bytes(width: int, quant: str, dtype_bytes: int = 2) -> int:
    """Bytes per token of a [T, width] linear input on the wire: `dtype_bytes` per element
    unquantised; int8 (+ the float32 per-token scale, dynamic) with int8 on the wire."""
    if quant == "none":
        return width * dtype_bytes
    return width + (SCALE_BYTES if quant == "w8a8_dynamic" else 0)


def _wire(kind: str, n: int, rows: int, width: int, b: int, quant: str) -> list[tuple[str, int, int]]:
    """The collective moving [rows, width] to a linear whose input the model quantises."""
    return [(kind, n, _ring(kind, rows * int8_row_bytes(width, quant, b), n))]


def estimate(m: ModelDims, tp: int, tokens: int, link: "Link | KindLinks", ks: list[int] | None = None,
             dp: int = 1, quant: str = "none") -> list[Estimate]:
    """Estimates for vanilla TP, FlashComm1, FlashComm2(K) alone and with FlashComm1, and (dp > 1)
    OTP / MLP-TP over dp ranks of DP attention, sorted by communication time then weight memory.
    `quant`: the model's linear inputs are quantised (see the module docstring: int8 on the wire;
    the FlashComm variants are listed with int8 communication and with `int8_comm: off`)."""
    if quant not in QUANTS:
        raise AdvisorError(f"quant={quant!r} must be one of {list(QUANTS)}")
    ks = ks or [1]
    validate(m, tp, tokens, link, None, dp)
    for k in ks:
        validate(m, tp, tokens, link, k, dp)
    out = _tp_estimates(m, tp, tokens, link, ks, quant)
    if dp > 1:
        out += _dp_estimates(m, tokens, link, dp, quant)
    # ties: less weight memory first, then the variant that also shards norms/residual (FlashComm1)
    out.sort(key=lambda e: (round(e.comm_us_per_layer, 6), e.weight_bytes_per_layer,
                            0 if "flashcomm1" in e.strategy else 1))
    return out



def _layer_weights(m: ModelDims) -> tuple[int, int, int]:
    """Bytes per layer of the qkv, MLP and o_proj weights, unsharded."""
    b = m.dtype_bytes
    return (m.hidden * (m.heads * m.head_dim + 2 * m.kv_heads * m.v_head_dim) * b, 3 * m.hidden * m.intermediate * b,
            m.hidden * m.attn_out * b)


def _variants(quant: str) -> list[tuple[str, str]]:
    """(wire quantisation, name suffix) of each variant listed: int8 on the wire and `int8_comm: off`."""
    return [("none", "")] if quant == "none" else [(quant, " int8"), ("none", " (int8_comm off)")]


def _estimate(link: "Link | KindLinks", name: str, colls: list, weight: int, why: str) -> Estimate:
    t = sum(link.collective_us(kd, n, nb) for kd, n, nb in colls)
    return Estimate(name, t, sum(nb for _, _, nb in colls), weight, colls, why)


def _tp_estimates(m: ModelDims, tp: int, T: int, link: "Link | KindLinks", ks: list[int], quant: str) -> list[Estimate]:
    """Vanilla TP, FlashComm1, and FlashComm2(K) alone and with FlashComm1."""
    b, H, D = m.dtype_bytes, m.hidden, m.attn_out
    Tp = padded(T, tp)
    qkv_w, mlp_w, oproj_w = _layer_weights(m)
    base_w = (qkv_w + mlp_w) // tp
    est = functools.partial(_estimate, link)
    out = []
    ar = ("all_reduce", tp, _ring("all_reduce", T * H * b, tp))
    out.append(est("vanilla", [ar, ar], base_w + oproj_w // tp,
                   "2 all-reduces of [T, H] per layer; every rank runs norms on all T rows"))
    rs = ("reduce_scatter", tp, _ring("reduce_scatter", Tp * H * b, tp))
    ag = ("all_gather", tp, _ring("all_gather", Tp * H * b, tp))
    for q, tag in _variants(quant):
        agq = _wire("all_gather", tp, Tp, H, b, q)   # the column inputs (qkv_proj, gate_up_proj)
        int8_why = ""
        if q != "none":
            int8_why = ("; int8 on the wire: the qkv_proj and gate_up_proj gathers send [T, H] in int8"
                        + (" + float32 per-token scales (in the same gather)" if q == "w8a8_dynamic" else "")
                        + _pays(H, tp, link, b, q))
        out.append(est("flashcomm1" + tag, [rs, *agq, rs, *agq], base_w + oproj_w // tp,
                       "same bytes as all-reduce (rs+ag), twice the collective launches (latency); norms and "
                       "residual run on T/tp rows (compute not modelled); pads T to a multiple of tp" + int8_why))
        for k in ks:
            n = tp // k
            a2a = _wire("all_to_all", n, Tp, D // tp, b, q)
            otp_rs = [("reduce_scatter", k, _ring("reduce_scatter", (Tp // n) * H * b, k))] if k > 1 else []
            w = base_w + oproj_w // k
            fc2_why = (f"o_proj exchange moves [T, D/tp] = {D // tp} features per token over {n} ranks "
                       f"instead of reducing [T, H] = {H}; o_proj weight stored at 1/{k} (+"
                       f"{(oproj_w // k - oproj_w // tp) / 2**20:.1f} MiB per layer per rank)")
            if q != "none":
                fc2_why += ("; int8 on the wire: the o_proj all_to_all sends [T, D/tp] in int8"
                            + (" + float32 per-token scales per chunk (in the same all_to_all)"
                               if q == "w8a8_dynamic" else "") + _pays(D // tp, n, link, b, q)
                            + "; needs plain int8 o_proj weights (weight_format: nd)")
            out.append(est(f"flashcomm2(K={k})" + tag, [*a2a, *otp_rs, ag, ar], w,
                           fc2_why + "; alone it must all-gather the o_proj output back and keep the MLP all-reduce"))
            out.append(est(f"flashcomm1+flashcomm2(K={k})" + tag, [*a2a, *otp_rs, *agq, rs, *agq], w,
                           fc2_why + "; the o_proj output chains into FlashComm1's sharded residual"
                           + (int8_why and "; column gathers in int8 as FlashComm1's")))
    return out


def _dp_estimates(m: ModelDims, T: int, link: "Link | KindLinks", dp: int, quant: str) -> list[Estimate]:
    """OTP and MLP-TP over dp ranks of DP attention."""
    b, H, D = m.dtype_bytes, m.hidden, m.attn_out
    qkv_w, mlp_w, oproj_w = _layer_weights(m)
    est = functools.partial(_estimate, link)
    out = []
    B = max(T // dp, 1)  # own tokens per DP rank
    otp_rs = ("reduce_scatter", dp, _ring("reduce_scatter", dp * B * H * b, dp))
    for q, tag in _variants(quant):
        otp_a2a = _wire("all_to_all", dp, B * dp, D // dp, b, q)  # B rows of K blocks of D/K features
        why = ("DP attention (TP=1 per rank, weights replicated); o_proj sharded over K ranks: "
               "all_to_all of [B, D] + reduce_scatter [K*B, H]")
        if q != "none":
            why += ("; int8 on the wire: the o_proj all_to_all sends [B, D] in int8"
                    + (" + each token's float32 scale per block (in the same all_to_all)"
                       if q == "w8a8_dynamic" else "") + _pays(D // dp, dp, link, b, q)
                    + "; needs plain int8 o_proj weights (weight_format: nd)")
        out.append(est(f"otp(K={dp})" + tag, [*otp_a2a, otp_rs], (qkv_w + mlp_w) + oproj_w // dp, why))
        mlp_ag = _wire("all_gather", dp, dp * B, H, b, q)  # gate_up_proj's input, quantised before it
        why = "DP attention; dense MLP sharded over K ranks: all_gather [B, H] + reduce_scatter"
        if q != "none":
            why += ("; int8 on the wire: the gate_up_proj all_gather sends [B, H] in int8"
                    + (" + float32 per-token scales (in the same gather)" if q == "w8a8_dynamic" else "")
                    + _pays(H, dp, link, b, q) + "; needs plain int8 MLP weights (weight_format: nd)")
        out.append(est(f"mlp_tp(K={dp})" + tag, [*mlp_ag, otp_rs], (qkv_w + oproj_w) + mlp_w // dp, why))
    return out


def _pays(width: int, n: int, link: "Link | KindLinks", b: int, quant: str) -> str:
    r = int8_row_bytes(width, quant, b) / (width * b)
    if r >= 1:
        return f" ({r:.2f}x the bytes: does not pay, keep int8_comm off)"
    return f" ({r:.2f}x the bytes of this collective, same launches: pays at every token count)"


def report(m: ModelDims, tp: int, tokens: int, link: "Link | KindLinks", ests: list[Estimate]) -> str:
    van = next(e for e in ests if e.strategy == "vanilla")
    w = max([28] + [len(e.strategy) for e in ests])
    lines = [f"MODEL ESTIMATE (cost model, not a measurement) -- {m.name}: hidden {m.hidden}, "
             f"o_proj input D={m.attn_out}, {m.layers} layers, {m.dtype_bytes}-byte activations; tp={tp}, "
             f"T={tokens} tokens/step; {link.describe()}",
             f"{'rank':<4} {'strategy':<{w}} {'comm us/layer':>13} {'MiB/layer':>9} {'vs vanilla':>10} "
             f"{'model comm ms':>13} {'weights MiB/layer':>17}"]
    for i, e in enumerate(ests, 1):
        lines.append(f"{i:<4} {e.strategy:<{w}} {e.comm_us_per_layer:>13.1f} {e.bytes_per_layer / 2**20:>9.2f} "
                     f"{e.comm_us_per_layer / van.comm_us_per_layer:>10.3f} {e.total_comm_ms(m.layers):>13.2f} "
                     f"{e.weight_bytes_per_layer / 2**20:>17.1f}")
    lines.append("why:")
    for e in ests:
        colls = ", ".join(f"{kd}[{n}] {nb / 2**20:.2f} MiB" for kd, n, nb in e.collectives)
        lines.append(f"  {e.strategy}: {e.why}. Collectives per layer: {colls}")
    best = ests[0]
    lines.append(f"recommendation: {best.strategy} ({best.comm_us_per_layer / van.comm_us_per_layer:.2f}x the "
                 "vanilla all-reduce time in this model)")
    return "\n".join(lines)


# ---- fused matmul + collective kernels (fxpasses.lowering) ---------------------------------------------

#: which pairs each platform's lowering fuses (see fxpasses.lowering.backends): npu all three,
#: cuda (symm_mem) no matmul + all-reduce
FUSED_KINDS = {"npu": ("mm_all_reduce", "mm_reduce_scatter", "all_gather_mm"),
               "cuda": ("mm_reduce_scatter", "all_gather_mm")}


@dataclass
class FusedEstimate:
    strategy: str
    pairs: list[tuple[str, str, float, float]]   # (layer, kind, comm us, matmul us) per fused pair
    unfused_us: float                            # comm + matmul of those pairs, one after the other
    fused_us: float                              # max(comm, matmul) + overhead per pair: overlapped
    break_even_tokens: int | None                # smallest T (powers of 2) from which fusing saves time

    @property
    def saved_us(self) -> float:
        return self.unfused_us - self.fused_us


def _layer_pairs(m: ModelDims, tp: int, tokens: int, link: "Link | KindLinks", strategy: str, tflops: float,
                 kinds: tuple[str, ...]) -> list[tuple[str, str, float, float]]:
    """The fusable matmul + collective pairs of one decoder layer under `strategy` and their comm and
    matmul times (matmul: 2 x rows x K x N flops at `tflops`)."""
    b, H, D, I, T = m.dtype_bytes, m.hidden, m.attn_out, m.intermediate, tokens
    Tp = padded(T, tp)
    qkv_out = m.heads * m.head_dim + 2 * m.kv_heads * m.v_head_dim
    mm = lambda rows, k, n: 2 * rows * k * n / (tflops * 1e6)  # noqa: E731  us
    comm = lambda kind, full: link.collective_us(kind, tp, _ring(kind, full, tp))  # noqa: E731
    pairs = []
    if strategy == "vanilla":
        pairs = [("o_proj", "mm_all_reduce", comm("all_reduce", T * H * b), mm(T, D // tp, H)),
                 ("down_proj", "mm_all_reduce", comm("all_reduce", T * H * b), mm(T, I // tp, H))]
    elif strategy.startswith("flashcomm1"):
        pairs = [("qkv_proj", "all_gather_mm", comm("all_gather", Tp * H * b), mm(Tp, H, qkv_out // tp)),
                 ("gate_up_proj", "all_gather_mm", comm("all_gather", Tp * H * b), mm(Tp, H, 2 * I // tp)),
                 ("down_proj", "mm_reduce_scatter", comm("reduce_scatter", Tp * H * b), mm(Tp, I // tp, H))]
        if "flashcomm2" not in strategy:
            pairs.append(("o_proj", "mm_reduce_scatter", comm("reduce_scatter", Tp * H * b), mm(Tp, D // tp, H)))
    elif strategy.startswith("flashcomm2"):  # alone: the MLP keeps its all-reduce
        pairs = [("down_proj", "mm_all_reduce", comm("all_reduce", T * H * b), mm(T, I // tp, H))]
    return [p for p in pairs if p[1] in kinds]


@dataclass(frozen=True)
class FusedKernels:
    """The platform whose fused matmul + collective kernels are estimated, its matmul throughput
    and each fused kernel's overhead (tiling, kernel set-up)."""

    platform: str
    tflops: float = 300.0
    overhead_us: float = 5.0


def fused_estimates(m: ModelDims, tp: int, tokens: int, link: "Link | KindLinks", ests: list[Estimate],
                    kernels: "FusedKernels | str") -> list[FusedEstimate]:
    """What the lowering's fused kernels save per layer for each estimated strategy (float layers; a
    MODEL ESTIMATE): a fused pair pipelines its matmul with its collective, so it costs
    max(comm, matmul) + `overhead_us` (tiling, kernel set-up) instead of comm + matmul. It pays when
    the shorter of the two exceeds the overhead: large token counts (prefill), not latency-bound
    decode steps. OTP / MLP-TP are not lowered (their pairs run over DP groups). `kernels`: a
    `FusedKernels`, or a platform name with the default throughput and overhead."""
    kernels = kernels if isinstance(kernels, FusedKernels) else FusedKernels(kernels)
    platform, tflops, overhead_us = kernels.platform, kernels.tflops, kernels.overhead_us
    if platform not in FUSED_KINDS:
        raise AdvisorError(f"fused kernels: platform {platform!r} must be one of {list(FUSED_KINDS)}")
    if not tflops > 0 or overhead_us < 0:
        raise AdvisorError("fused kernels: tflops must be positive and overhead_us >= 0")
    kinds = FUSED_KINDS[platform]
    out = []
    for e in ests:
        name = e.strategy.split(" ")[0]
        if name.startswith(("otp", "mlp_tp")):
            continue
        pairs = _layer_pairs(m, tp, tokens, link, name, tflops, kinds)
        if not pairs:
            continue

        def cost(ps):
            return sum(c + t for _, _, c, t in ps), sum(max(c, t) + overhead_us for _, _, c, t in ps)

        unfused, fused = cost(pairs)
        even = None
        t = 1
        while t <= 1 << 20:
            u, f = cost(_layer_pairs(m, tp, t, link, name, tflops, kinds))
            if f < u:
                even = t
                break
            t *= 2
        out.append(FusedEstimate(e.strategy, pairs, unfused, fused, even))
    return out


def fused_report(m: ModelDims, tokens: int, fes: list[FusedEstimate], platform: str, tflops: float,
                 overhead_us: float) -> str:
    lines = [f"fused kernels ({platform} lowering; MODEL ESTIMATE: matmul at {tflops:g} TFLOPS, "
             f"{overhead_us:g} us overhead per fused kernel, overlap = max(comm, matmul)):"]
    for f in fes:
        pays = (f"pays from T >= {f.break_even_tokens}" if f.break_even_tokens else "never pays in this model")
        verdict = "saves" if f.saved_us > 0 else "costs"
        lines.append(f"  {f.strategy}: {len(f.pairs)} fused pairs/layer "
                     f"({', '.join(f'{layer}:{kind}' for layer, kind, _, _ in f.pairs)}); comm+matmul "
                     f"{f.unfused_us:.1f} -> {f.fused_us:.1f} us/layer at T={tokens} ({verdict} "
                     f"{abs(f.saved_us):.1f} us/layer, {abs(f.saved_us) * m.layers / 1e3:.2f} ms/step); {pays}")
    if platform == "cuda":
        lines.append("  (cuda: torch symm_mem has no fused matmul + all-reduce, so vanilla TP gains nothing)")
    return "\n".join(lines)
