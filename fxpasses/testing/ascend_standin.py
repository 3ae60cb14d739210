"""A CPU simulation of vllm-ascend's compile path, for what cannot exist here (vllm_ascend, torch_npu,
an NPU). Written from vllm-ascend's sources (`vllm_ascend/platform.py`, `vllm_ascend/utils.py`,
`vllm_ascend/compilation/graph_fusion_pass_manager.py`, `.../compiler_interface.py`); everything
else is the real thing (vLLM's `split_graph`, `pass_context`, `VllmInductorPass`, torch's
`aot_autograd`).

* `AscendPlatformStandin`: the current vLLM platform (CPU here) with vllm-ascend's `pass_key`
  (`"graph_fusion_manager"`), pass-manager class and compile backend; set it as
  `vllm.platforms.current_platform` (and `vllm.compilation.backends.current_platform` for
  `VllmBackend`) to see what vLLM and fxpasses do on vllm-ascend.
* `GraphFusionPassManagerStandin`: `GraphFusionPassManager`'s behaviour: `add()` asserts the pass is
  a `VllmInductorPass` (a bare `assert`, as there), `__call__(gm)` reads the compile range from
  vLLM's pass context, calls every pass that accepts it with the GraphModule, recompiles it and
  returns it. `configure()` turns on vllm-ascend's default NPU fusions, which `__call__` runs first,
  in vllm-ascend's order (`fxpasses.testing.ascend_fusions`; on graphs of vLLM's own layers they
  find nothing to fuse). Every call is recorded (range, passes called, collective counts
  before/after).
* `ascend_compile(gm, example_inputs, manager, compile_range)`: `AscendCompiler.compile` with
  npugraph_ex off (`fusion_pass_compile`): a deep copy of the graph, made to return a tuple, through
  `aot_autograd` (no decompositions: vllm-ascend passes none to it) whose forward compiler runs the
  manager on the GraphModule and returns the GraphModule itself, executed eagerly. Inside vLLM's
  `pass_context(compile_range)`, as vLLM's `CompilerManager` calls it.
* `AscendStandinBackend(manager, splitting_ops)`: a Dynamo backend doing what `VllmBackend` does
  around that compiler: vLLM's own `split_graph` at `splitting_ops` (`[]`: one piece, the whole
  graph, as vllm-ascend's FULL modes with npugraph_ex off; attention ops: PIECEWISE /
  FULL_AND_PIECEWISE), every non-splitting piece compiled once for the dynamic range with the
  pieces' example inputs being Dynamo's example values (pieces are not run to get them), the
  splitting pieces run as they are.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

ASCEND_PASS_KEY = "graph_fusion_manager"
MANAGER_CLS = "fxpasses.testing.ascend_standin.GraphFusionPassManagerStandin"
#: vllm-ascend's own compile backend (`get_compile_backend`); here only a name: VllmBackend is not
#: driven with it, `AscendStandinBackend` is the compile path
ASCEND_COMPILER_CLS = "vllm_ascend.compilation.compiler_interface.AscendCompiler"


class AscendPlatformStandin:
    """vllm-ascend's platform, as far as compilation is concerned, over the real current platform
    (every other attribute is the wrapped platform's)."""

    def __init__(self, base):
        object.__setattr__(self, "_base", base)

    @property
    def pass_key(self) -> str:
        return ASCEND_PASS_KEY

    @classmethod
    def get_pass_manager_cls(cls) -> str:
        return MANAGER_CLS

    @classmethod
    def get_compile_backend(cls) -> str:
        return ASCEND_COMPILER_CLS

    @classmethod
    def use_custom_op_collectives(cls) -> bool:
        return True  # vllm.all_reduce in the graph, as on NPU

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_base"), name)


def _counts(graph: fx.Graph) -> dict[str, int]:
    from fxpasses.report import collective_counts
    return collective_counts(graph)


class GraphFusionPassManagerStandin:
    """vllm-ascend's `GraphFusionPassManager` (see the module docstring), recording its calls."""

    def __init__(self):
        self.passes: list = []
        self.calls: list[dict[str, Any]] = []
        self.configured_with = None
        self.fusions: dict[str, Any] | None = None  # ascend_compilation_config once configured

    def add(self, pass_) -> None:
        from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

        assert isinstance(pass_, VllmInductorPass)
        self.passes.append(pass_)

    def configure(self, config) -> None:
        # vllm-ascend appends its default NPU fusion passes here (norm+quant, qknorm+rope, muls+add), on
        # unless additional_config["ascend_compilation_config"] turns them off; they run before every
        # pass added after (`fxpasses.testing.ascend_fusions`)
        self.configured_with = config
        ac = getattr(config, "additional_config", None) or {}
        self.fusions = dict(ac.get("ascend_compilation_config") or {}) if isinstance(ac, dict) else {}

    def __call__(self, graph: fx.GraphModule) -> fx.GraphModule:
        from vllm.compilation.passes.inductor_pass import get_pass_context

        compile_range = get_pass_context().compile_range
        before = _counts(graph.graph)
        called, fused = [], None
        if self.fusions is not None:
            from fxpasses.testing.ascend_fusions import run_default_fusions
            fused = run_default_fusions(graph.graph, self.fusions)
        for p in self.passes:
            if p.is_applicable_for_range(compile_range):
                p(graph)
                called.append(type(p).__name__)
        graph.recompile()
        self.calls.append({"range": str(compile_range), "fusions": fused, "called": called, "before": before,
                           "after": _counts(graph.graph)})
        return graph


def _returns_tuple(gm: fx.GraphModule) -> bool:
    from torch._inductor.compile_fx import graph_returns_tuple
    return graph_returns_tuple(gm)


def ascend_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], manager: Callable,
                   compile_range) -> Callable:
    """One piece through vllm-ascend's compiler (npugraph_ex off); see the module docstring."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import detect_fake_mode
    from torch._inductor.compile_fx import make_graph_return_tuple
    from vllm.compilation.passes.inductor_pass import pass_context

    gm = copy.deepcopy(gm)  # as AscendCompiler.compile: compilation may change the graph in place
    fake_mode = detect_fake_mode()
    if fake_mode is not None:
        example_inputs = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) and hasattr(t, "fake_mode")
                          and t.fake_mode is not fake_mode else t for t in example_inputs]

    def fw_compiler(fgm: fx.GraphModule, _inputs):
        return manager(fgm)  # the GraphModule, run as it is

    def compile_fx(g, inputs):
        if not _returns_tuple(g):
            return make_graph_return_tuple(g, inputs, compile_fx)
        return aot_autograd(fw_compiler=fw_compiler)(g, inputs)

    with pass_context(compile_range):
        return compile_fx(gm, list(example_inputs))


class _PieceCompiler(fx.Interpreter):
    """vLLM's `PiecewiseCompileInterpreter`, reduced: each piece to compile is compiled with the
    example values Dynamo recorded for its inputs and replaced by the compiled callable."""

    def __init__(self, split_gm: fx.GraphModule, names: list[str], compile_piece: Callable):
        super().__init__(split_gm)
        self.names, self.compile_piece = names, compile_piece
        self.extra_traceback = False

    def call_module(self, target, args, kwargs):
        gm = getattr(self.module, target)
        out = fx.map_arg(gm.graph.output_node().args[0], lambda n: n.meta["example_value"])
        if target in self.names:
            self.module.__dict__[target] = self.compile_piece(gm, list(args))
        return out


class AscendStandinBackend:
    """Dynamo backend: split (vLLM's `split_graph`), compile every non-splitting piece through
    `ascend_compile` with `manager`, run the rest as it is. `pieces` names the compiled pieces."""

    def __init__(self, manager, splitting_ops: Sequence[str] = (), compile_range=None):
        from vllm.config.utils import Range

        self.manager = manager
        self.splitting_ops = list(splitting_ops)
        self.compile_range = compile_range if compile_range is not None else Range(start=1, end=8192)
        self.pieces: list[str] = []
        self.split_gm: fx.GraphModule | None = None

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        from vllm.compilation.backends import split_graph

        split_gm, items = split_graph(gm, self.splitting_ops)
        names = [i.submod_name for i in items if not i.is_splitting_graph]
        self.pieces.extend(names)
        fakes = [n.meta["example_value"] for n in gm.graph.find_nodes(op="placeholder")]
        args = [fakes[i] if isinstance(t, torch.Tensor) else t for i, t in enumerate(example_inputs)]
        _PieceCompiler(split_gm, names,
                       lambda piece, piece_args: ascend_compile(piece, piece_args, self.manager,
                                                                self.compile_range)).run(*args)
        self.split_gm = split_gm
        return split_gm
