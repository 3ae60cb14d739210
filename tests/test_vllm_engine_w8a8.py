"""int8 on the wire in vLLM CPU's own W8A8 path, end to end in the real engine at TP=2.

The checkpoint is a tiny random Llama written as compressed-tensors W8A8 ("int-quantized": int8
weights with a scale per output channel; `fxpasses.commands.tiny_checkpoints`, `quant=`). vLLM's CPU engine
serves it with its own int8 kernels: `_C.dynamic_scaled_int8_quant` (per-token scales) or
`_C.static_scaled_int8_quant` (one per-tensor scale), then `_C.onednn_scaled_mm` with the weight
packed by oneDNN. `fxpasses check` runs the engine without and with the pass.

What FlashComm1 does there: the activation quantisation is token-wise, so it runs on this rank's
token shard and the column all-gathers (qkv_proj, gate_up_proj) move int8 values (+ the float32
per-token scales as 4 more int8 columns of the same gather, dynamic scheme). Quantising the shards
and gathering equals gathering and quantising, value for value, so int8 communication adds no
quantisation error of its own; what may differ is the reduce-scatter's order of additions, which
the float32 tolerance of `fxpasses check` (1e-3 in logprobs) covers, and a wrong shard, scale or
collective does not (it changes tokens). FlashComm2 cannot slice a oneDNN-packed weight, so it
leaves o_proj to FlashComm1 and says why.

Bytes at T = 256 tokens, H = 128, 2 layers: each of the 4 column all-gathers sends
(tp-1)/tp * T * (H + 4) bytes (dynamic) or (tp-1)/tp * T * H (static), against
(tp-1)/tp * T * H * 4 for the float32 gather it replaces: (H + 4) / 4H = 0.26x and 0.25x
(against bfloat16: 0.52x and 0.5x).
On AMX CPUs vLLM takes another kernel for these aligned shapes (K % 32 == 0, N % 16 == 0):
`_C.int8_scaled_mm_with_quant`, bfloat16 activations only, the quantisation inside the matmul.
The engines then run in bfloat16 (`fxpasses.cpu_kernels`), and int8 cannot go on the wire: the
quantisation cannot move before the all_gather (vLLM CPU has no int8-input matmul for that packed
weight), the column sites say so, and FlashComm1 moves the bfloat16 input at the all-reduce's
bytes. The oneDNN path's int8 claim is then proven on the same CPU by a checkpoint whose hidden
size (136) no AMX int8 tile divides, which vLLM serves with oneDNN there too.
Each case starts two engines (about two minutes)."""
from __future__ import annotations

import pytest

from fxpasses import cpu_kernels
from fxpasses.commands.check import EXIT_OK, TOLERANCE, run_check
from fxpasses.commands.tiny_checkpoints import DEFAULT_SHAPE, make_tiny_model

pytestmark = pytest.mark.engine  # starts vLLM engines: the second tier (tools/test.sh)

T = 256
TP = 2
H = DEFAULT_SHAPE["hidden_size"]
LAYERS = DEFAULT_SHAPE["num_hidden_layers"]
COLUMN_SITES = 2 * LAYERS  # qkv_proj and gate_up_proj per layer
FUSED = "_C.int8_scaled_mm_with_quant"


def _check_int8_gathers(res, quant: str, strategies: str, hidden: int) -> None:
    assert res.exit_code == EXIT_OK, res.message
    assert res.outputs_equal and res.max_logprob_diff <= res.tolerance == TOLERANCE[res.dtype], res.message
    assert res.applied_ranks == [0, 1]
    by_prefix = {s["prefix"]: s for s in res.sites}
    assert all(s["status"] == "rewritten" for s in res.sites) and len(res.sites) == 1 + 4 * LAYERS
    if "flashcomm2" in strategies:
        for i in range(LAYERS):
            reason = by_prefix[f"model.layers.{i}.self_attn.o_proj"]["reason"]
            assert "flashcomm2 skipped it" in reason and "packed weight" in reason, reason
    assert FUSED not in res.kernels, res.kernels
    assert "_C.onednn_scaled_mm" in res.kernels, res.kernels
    row = T * (hidden + 4) if quant == "w8a8_dynamic" else T * hidden  # int8 values (+ 4 bytes of scale)
    int8_expected = COLUMN_SITES * row * (TP - 1) // TP
    assert res.int8_bytes_after[T] == int8_expected
    # FlashComm1 moves the all-reduce's bytes (reduce-scatter + all-gather): what it saves here is
    # exactly the float column gathers' bytes less their int8 bytes
    esize = 4 if res.dtype == "float32" else 2
    float_gathers = COLUMN_SITES * T * hidden * esize * (TP - 1) // TP
    assert res.bytes_before[T] - res.bytes_after[T] == float_gathers - int8_expected


# one engine pair: dynamic W8A8 under FlashComm1 + FlashComm2 (static W8A8's quantisation op and its
# int8 gathers are checked per rank in the first tier: test_int8_on_the_wire)
@pytest.mark.parametrize("quant,strategies", [("w8a8_dynamic", "flashcomm1+flashcomm2")])
def test_engine_w8a8_int8_column_gathers(tmp_path, quant, strategies, engine_log):
    res = engine_log(run_check(None, TP, strategies, arch="llama", quant=quant, workdir=tmp_path, bytes_at=[T],
                               progress=lambda line: None))
    if FUSED not in res.kernels:  # oneDNN: quantisation op, then the int8 matmul
        _check_int8_gathers(res, quant, strategies, H)
        return
    # AMX: the quantisation is inside the matmul; bfloat16 engines; no int8 on the wire, and said why
    assert cpu_kernels.capabilities().amx and res.dtype == "bfloat16", (res.cpu, res.dtype)
    assert res.exit_code == EXIT_OK, res.message
    assert res.outputs_equal and res.max_logprob_diff <= res.tolerance == TOLERANCE["bfloat16"], res.message
    columns = [s for s in res.sites if s["prefix"].endswith(("qkv_proj", "gate_up_proj"))]
    assert len(columns) == COLUMN_SITES and all(
        s["status"] == "rewritten" and f"no int8 on the wire: {FUSED}" in s["reason"] for s in columns), columns
    assert all(s["status"] == "rewritten" for s in res.sites), res.sites
    assert res.int8_bytes_after[T] == 0
    assert res.bytes_after[T] == res.bytes_before[T]  # all-reduce -> reduce-scatter + all-gather, bf16 both


def test_engine_w8a8_onednn_path_where_amx_would_fuse_the_quantisation(tmp_path, engine_log):
    if not cpu_kernels.capabilities().amx:
        pytest.skip("without AMX the W8A8 test above runs vLLM's oneDNN int8 path on this CPU already")
    hidden = 136  # K % 32 != 0 (qkv, gate_up) and N % 16 != 0 (o_proj, down): oneDNN for every linear
    model = make_tiny_model(tmp_path / "tiny_llama_w8a8_h136", "llama", quant="w8a8_dynamic", hidden_size=hidden)
    res = engine_log(run_check(model, TP, "flashcomm1", workdir=tmp_path / "run", bytes_at=[T],
                               progress=lambda line: None))
    _check_int8_gathers(res, "w8a8_dynamic", "flashcomm1", hidden)
