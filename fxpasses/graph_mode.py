"""Which graph the pass is handed: the whole model, or one piece of vLLM's FX split.

vLLM's VLLM_COMPILE mode (CUDA's default, vllm-ascend's PIECEWISE / FULL_AND_PIECEWISE) splits the
Dynamo graph at `splitting_ops` (attention) and runs the post-grad pass once per piece and compile
range; a piece's inputs and outputs keep the shapes of the original graph. Whole-graph modes: every
other compilation mode (vLLM's CPU build: DYNAMO_TRACE_ONCE), `use_inductor_graph_partition=True`,
and `splitting_ops=[]` (vllm-ascend FULL / FULL_DECODE_ONLY, where with `enable_npugraph_ex=false`
its pass manager sees the whole graph). Every rank reads the same configuration, so every piece and
range decides identically on every rank.

`graph_mode_of(vllm_config, platform)` states the mode; `WHOLE_GRAPH_SETTINGS` is the data behind
the hint the site report and the log give when FlashComm1 cannot pay in a piece.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# platform -> the configuration line that hands the pass the whole model
WHOLE_GRAPH_SETTINGS = {
    "cuda": ('compilation_config={"use_inductor_graph_partition": true} (torch >= 2.9; keeps piecewise '
             'CUDA graphs) or compilation_config={"splitting_ops": []} (full CUDA graphs only)'),
    "ascend": ('compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"} and additional_config='
               '{"ascend_compilation_config": {"enable_npugraph_ex": false}}'),
}


@dataclass(frozen=True)
class GraphMode:
    """`kind`: "whole" or "piece"; `why`: the configuration that makes it so; `whole_graph_setting`:
    for a piece, the line that gives the whole graph instead; `boundaries`: for a piece, whether its
    boundary token tensors are sharded or replicated, and why."""

    kind: str
    why: str
    whole_graph_setting: str = ""
    # for a piece: how its token tensors cross the boundaries (`fxpasses.piece_boundaries`)
    boundaries: str = ""

    @property
    def is_piece(self) -> bool:
        return self.kind == "piece"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


WHOLE_BY_CALLER = GraphMode("whole", "the caller handed one graph (library use, no vLLM compilation config)")


def platform_family(pass_key: str | None = None) -> str:
    """"ascend" on vllm-ascend (its pass key), else "cuda" (the VLLM_COMPILE default elsewhere)."""
    if pass_key is None:
        try:
            from vllm.platforms import current_platform
            pass_key = getattr(current_platform, "pass_key", None)
        except Exception:  # no vLLM platform resolvable: the upstream default
            pass_key = None
    return "ascend" if pass_key == "graph_fusion_manager" else "cuda"


def graph_mode_of(vllm_config: Any, pass_key: str | None = None) -> GraphMode:
    """The mode the compilation config gives the graphs the pass is called with."""
    cc = getattr(vllm_config, "compilation_config", None)
    if cc is None:
        return WHOLE_BY_CALLER
    mode = getattr(cc, "mode", None)
    name = getattr(mode, "name", str(mode))
    if name != "VLLM_COMPILE":
        return GraphMode("whole", f"compilation mode {name}: vLLM compiles the model as one graph")
    if getattr(cc, "use_inductor_graph_partition", False):
        return GraphMode("whole", "use_inductor_graph_partition=True: Inductor partitions after the pass")
    ops = list(getattr(cc, "splitting_ops", None) or [])
    if not ops:
        return GraphMode("whole", "splitting_ops=[]: the graph is not split")
    shown = ", ".join(ops[:4]) + (f", ... ({len(ops)} ops)" if len(ops) > 4 else "")
    return GraphMode("piece", f"VLLM_COMPILE splits the model at splitting_ops=[{shown}]; this graph is one "
                              "piece, its inputs and outputs keep the original shapes",
                     WHOLE_GRAPH_SETTINGS[platform_family(pass_key)])
