"""fxpasses on vllm-ascend: the pass object vllm-ascend's graph-fusion pass manager accepts.

This module owns the adaptation of the fxpasses rewrite to vllm-ascend's compile path, which does
not run Inductor (read from vllm-ascend, `vllm_ascend/platform.py`, `utils.py`,
`compilation/graph_fusion_pass_manager.py`, `compilation/compiler_interface.py`):

* the platform's `pass_key` is `"graph_fusion_manager"`, not `"post_grad_custom_post_pass"`;
  vLLM's `VllmBackend.configure_post_pass` adds `compilation_config.inductor_compile_config[pass_key]`
  to the platform's pass manager (`GraphFusionPassManager`), whose `add()` asserts that the pass is
  a `VllmInductorPass`;
* its compiler runs `aot_autograd` with a forward compiler that calls the manager with the forward
  `GraphModule` (inside vLLM's `pass_context(compile_range)`), the manager calls each pass whose
  `is_applicable_for_range` accepts the range with that GraphModule and then recompiles it, and the
  GraphModule is executed as it is (eagerly, or captured by the ACL graph wrapper);
* a pass registered as Inductor's `post_grad_custom_post_pass` is never called there.

`FxPassesAscendPass` is that `VllmInductorPass`. It runs exactly the rewrite of
`fxpasses.vllm_pass.FxPassesInductorPass`, by delegating to one (same configuration sources, same
loud failure of a started rewrite, same `min_tokens` gating per compile range, same inputs to
`uuid()`); it only unwraps the GraphModule. `ChainedAscendPass` runs several such passes in order
(the plugin uses it when another pass is registered under the key already). The plugin
(`fxpasses.plugin`) registers the pass under the platform's key.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch.fx as fx
from vllm.compilation.passes.inductor_pass import InductorPass
from vllm.compilation.passes.vllm_inductor_pass import InductorCompilationConfig, VllmInductorPass

from fxpasses.vllm_pass import FxPassesInductorPass, compile_range_of_current_pass

#: vllm-ascend's `COMPILATION_PASS_KEY` (`vllm_ascend/utils.py`), its platform's `pass_key`
ASCEND_PASS_KEY = "graph_fusion_manager"


def _init_vllm_fields(p: VllmInductorPass, vllm_config) -> None:
    """The fields `VllmInductorPass.__init__` sets (used by vLLM's timing / dump helpers only). A
    partial or absent configuration (a tool, a test) gets the defaults."""
    if vllm_config is not None:
        try:
            VllmInductorPass.__init__(p, vllm_config)
            return
        except AttributeError:
            pass
    p.compilation_config = InductorCompilationConfig()
    p.pass_config = None
    p.model_dtype = None
    p.device = None
    p.pass_name = type(p).__name__


def _graph_of(graph) -> fx.Graph:
    """vllm-ascend hands passes the forward GraphModule; Inductor's hook hands an fx.Graph."""
    return graph.graph if isinstance(graph, fx.GraphModule) else graph


class FxPassesAscendPass(VllmInductorPass):
    """The fxpasses rewrite as a pass of vllm-ascend's `GraphFusionPassManager`.

    `FxPassesAscendPass(vllm_config)` reads its configuration like `FxPassesInductorPass()` (vLLM's
    `additional_config["fxpasses"]`, `FXPASSES_CONFIG`, `FXPASSES_DUMP_DIR`, the vllm-ascend
    switches); keyword arguments override it (`FxPassesAscendPass(vllm_config, strategies=["sp"])`);
    `inner=` wraps an existing `FxPassesInductorPass` instead (its configuration and binding are
    used as they are). `vllm_config` may be None outside an engine.

    Register it as `compilation_config={"inductor_compile_config": {"graph_fusion_manager": p}}`, or
    let the plugin do it. The manager recompiles the GraphModule after its passes, so the rewrite
    does not (as under Inductor, which recompiles after its post-grad passes).
    """

    def __init__(self, vllm_config=None, *, inner: FxPassesInductorPass | None = None, **overrides: Any):
        _init_vllm_fields(self, vllm_config)
        if inner is not None and overrides:
            raise TypeError("give either inner= (an FxPassesInductorPass) or configuration keywords, not both")
        if inner is not None and not isinstance(inner, FxPassesInductorPass):
            raise TypeError(f"inner must be an FxPassesInductorPass, got {type(inner).__name__}")
        self.inner = inner if inner is not None else FxPassesInductorPass(**overrides)
        self.inner.platform_pass_key = ASCEND_PASS_KEY

    # -- configuration: the inner pass's ----------------------------------------------------------
    @property
    def overrides(self) -> dict[str, Any]:
        return self.inner.overrides

    def bind(self, vllm_config) -> "FxPassesAscendPass":
        """Remember the parts of `vllm_config` the pass reads (see `FxPassesInductorPass.bind`)."""
        self.inner.bind(vllm_config)
        return self

    def resolve_config(self, env: Mapping[str, str] | None = None):
        return self.inner.resolve_config(env)

    def validate(self, cfg, tp: int, world: int | None = None) -> None:
        self.inner.validate(cfg, tp, world)

    # -- the pass ---------------------------------------------------------------------------------
    def uuid(self) -> str:
        # the inner uuid covers configuration, pattern contents, tp/rank/world and fxpasses' source;
        # the class name keeps this route's cache entries apart from the Inductor route's
        return InductorPass.hash_dict({"pass": type(self).__qualname__, "inner": self.inner.uuid()})

    def is_applicable_for_range(self, compile_range) -> bool:
        return self.inner.is_applicable_for_range(compile_range)

    def __call__(self, graph) -> None:
        self.inner(_graph_of(graph))

    def __repr__(self) -> str:
        return f"FxPassesAscendPass(overrides={self.inner.overrides!r})"


class ChainedAscendPass(VllmInductorPass):
    """Several passes under one pass-manager key, run in order on the same graph; each one only for
    the compile ranges it accepts (`is_applicable_for_range`)."""

    def __init__(self, passes: list, vllm_config=None):
        _init_vllm_fields(self, vllm_config)
        self.passes = list(passes)

    @staticmethod
    def _applicable(p, compile_range) -> bool:
        check = getattr(p, "is_applicable_for_range", None)
        return compile_range is None or check is None or bool(check(compile_range))

    def is_applicable_for_range(self, compile_range) -> bool:
        return any(self._applicable(p, compile_range) for p in self.passes)

    def __call__(self, graph) -> None:
        rng = compile_range_of_current_pass()
        for p in self.passes:
            if self._applicable(p, rng):
                # the Inductor form of our pass takes an fx.Graph; everything else gets what we got
                p(_graph_of(graph) if isinstance(p, FxPassesInductorPass) else graph)

    def uuid(self) -> str:
        return InductorPass.hash_dict({"chain": [p.uuid() if hasattr(p, "uuid") else repr(p) for p in self.passes]})

    def __repr__(self) -> str:
        return f"ChainedAscendPass({self.passes!r})"
