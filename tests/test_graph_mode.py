"""Which graph the pass is handed (whole model or one piece of vLLM's FX split), read from vLLM's own
CompilationConfig, and the start-up warning for FlashComm1 under the FX split."""
import logging
import os
from types import SimpleNamespace
from unittest import mock

import pytest

pytest.importorskip("vllm")

from vllm.config import CompilationConfig, CompilationMode  # noqa: E402

from fxpasses.graph_mode import graph_mode_of  # noqa: E402

ATTN = ["vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"]


def _vc(**cc):
    return SimpleNamespace(compilation_config=CompilationConfig(**cc))


def test_vllm_compile_with_splitting_ops_hands_pieces():
    m = graph_mode_of(_vc(mode=CompilationMode.VLLM_COMPILE, splitting_ops=ATTN), "post_grad_custom_post_pass")
    assert m.is_piece and "unified_attention_with_output" in m.why
    assert "use_inductor_graph_partition" in m.whole_graph_setting
    ascend = graph_mode_of(_vc(mode=CompilationMode.VLLM_COMPILE, splitting_ops=ATTN), "graph_fusion_manager")
    assert ascend.is_piece and "enable_npugraph_ex" in ascend.whole_graph_setting


@pytest.mark.parametrize("cc, why", [
    (dict(mode=CompilationMode.VLLM_COMPILE, splitting_ops=ATTN, use_inductor_graph_partition=True),
     "use_inductor_graph_partition"),
    (dict(mode=CompilationMode.VLLM_COMPILE, splitting_ops=[]), "splitting_ops=[]"),
    (dict(mode=CompilationMode.DYNAMO_TRACE_ONCE, splitting_ops=ATTN), "DYNAMO_TRACE_ONCE"),
])
def test_whole_graph_modes(cc, why):
    m = graph_mode_of(_vc(**cc))
    assert m.kind == "whole" and why in m.why and not m.whole_graph_setting


def test_library_use_is_whole():
    assert graph_mode_of(None).kind == "whole"


@pytest.mark.parametrize("strategies, warned", [(["flashcomm1"], True), (["flashcomm1", "flashcomm2"], True),
                                                (["flashcomm2"], False)])
def test_plugin_warns_at_start_up_for_flashcomm1_in_pieces(strategies, warned, caplog):
    from fxpasses import vllm_pass
    from fxpasses.plugin import configure_vllm_config

    vllm_pass._RESOLVED.clear()
    vc = SimpleNamespace(model_config=object(), additional_config={"fxpasses": {"strategies": strategies}},
                         parallel_config=SimpleNamespace(tensor_parallel_size=4, world_size=4),
                         compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                                                              splitting_ops=ATTN))
    fx = logging.getLogger("fxpasses")
    parent, fx.parent = fx.parent, logging.getLogger()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FXPASSES_", "VLLM_ASCEND_"))}
        with mock.patch.dict(os.environ, env, clear=True), caplog.at_level(logging.WARNING, logger="fxpasses"):
            assert configure_vllm_config(vc) is not None
    finally:
        fx.parent = parent
    msgs = [r.getMessage() for r in caplog.records if "piece boundary" in r.getMessage()]
    assert bool(msgs) == warned
    if warned:
        assert "use_inductor_graph_partition" in msgs[0] and "flashcomm1" in msgs[0]
