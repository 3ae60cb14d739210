"""int8 on the wire in vLLM CPU's own W8A8 path, end to end in the real engine at TP=2.

The checkpoint is a tiny random Llama written as compressed-tensors W8A8 ("int-quantized": int8
weights with a scale per output channel; `fxpasses.tiny_checkpoints`, `quant=`). vLLM's CPU engine
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
Each case starts two engines (about two minutes)."""
from __future__ import annotations

import pytest

from fxpasses.check import EXIT_OK, run_check
from fxpasses.tiny_checkpoints import DEFAULT_SHAPE

T = 256
TP = 2
H = DEFAULT_SHAPE["hidden_size"]
LAYERS = DEFAULT_SHAPE["num_hidden_layers"]
COLUMN_SITES = 2 * LAYERS  # qkv_proj and gate_up_proj per layer


@pytest.mark.parametrize("quant,strategies", [("w8a8_dynamic", "flashcomm1+flashcomm2"),
                                              ("w8a8", "flashcomm1")])
def test_engine_w8a8_int8_column_gathers(tmp_path, quant, strategies):
    res = run_check(None, TP, strategies, arch="llama", quant=quant, workdir=tmp_path, bytes_at=[T],
                    progress=lambda line: None)
    assert res.exit_code == EXIT_OK, res.message
    assert res.tokens_equal and res.max_logprob_diff <= res.tolerance == 1e-3
    assert res.applied_ranks == [0, 1]
    by_prefix = {s["prefix"]: s for s in res.sites}
    assert all(s["status"] == "rewritten" for s in res.sites) and len(res.sites) == 1 + 4 * LAYERS
    if "flashcomm2" in strategies:
        for i in range(LAYERS):
            reason = by_prefix[f"model.layers.{i}.self_attn.o_proj"]["reason"]
            assert "flashcomm2 skipped it" in reason and "packed weight" in reason, reason
    row = T * (H + 4) if quant == "w8a8_dynamic" else T * H   # int8 values (+ 4 bytes of scale per token)
    int8_expected = COLUMN_SITES * row * (TP - 1) // TP
    assert res.int8_bytes_after[T] == int8_expected
    # FlashComm1 in float32 moves the all-reduce's bytes (reduce-scatter + all-gather): what it saves
    # here is exactly the float32 column gathers' bytes less their int8 bytes
    float_gathers = COLUMN_SITES * T * H * 4 * (TP - 1) // TP
    assert res.bytes_before[T] - res.bytes_after[T] == float_gathers - int8_expected
