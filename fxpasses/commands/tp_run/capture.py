"""Capture the post-grad ATen graph Inductor would hand to `post_grad_custom_post_pass`, without codegen.

`compile_with_pass(module, on_graph)` runs Dynamo + AOTAutograd with Inductor's decomposition
table, joint-graph passes and post-grad passes, calling `on_graph(graph)` exactly where Inductor
calls `post_grad_custom_post_pass` (the graph a vLLM custom pass sees: parameters lifted to
placeholders, symbolic token count). The resulting graph is then run eagerly as an fx
GraphModule instead of going through Inductor's code generation, which keeps a capture to a few
seconds. `capture.use_original = True` runs the untouched graph (copied at the hook) instead.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass


class _Hook(CustomGraphPass):
    """Stands where vLLM's pass stands: Inductor's `post_grad_custom_post_pass`."""

    def __init__(self, on_graph, pre=None):
        self.on_graph, self.pre = on_graph, pre
        self.before: fx.GraphModule | None = None

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        if self.pre is not None:  # what runs before the pass (a platform's own fusions): part of "before"
            self.pre(graph)
        gm.recompile()
        self.before = copy.deepcopy(gm)
        if self.on_graph is not None:
            self.on_graph(graph)

    def uuid(self):
        return None


class _Capture:
    def __init__(self, on_graph: Callable[[fx.GraphModule], fx.GraphModule] | None, pre=None):
        self.on_graph, self.pre = on_graph, pre
        self.graphs: list[fx.GraphModule] = []
        self.originals: list[fx.GraphModule] = []
        self.use_original = False  # run the untouched post-grad graphs instead of the rewritten ones
        self.first_args: list[Any] | None = None  # AOT's flat runtime args of the first call

    def backend(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        from torch._dynamo.backends.common import aot_autograd
        from torch._inductor.decomposition import select_decomp_table

        def fw_compiler(fgm: fx.GraphModule, args):
            from torch._guards import detect_fake_mode
            from torch._inductor import config as inductor_config
            from torch._inductor.fx_passes.joint_graph import joint_graph_passes
            from torch._inductor.fx_passes.post_grad import post_grad_passes
            from torch._inductor.virtualized import V

            hook = _Hook(self.on_graph, self.pre)
            fake_mode = detect_fake_mode(args)
            with V.set_fake_mode(fake_mode), inductor_config.patch(post_grad_custom_post_pass=hook):
                joint_graph_passes(fgm)
                post_grad_passes(fgm, is_inference=True)
            fgm.recompile()
            original = hook.before
            self.originals.append(original)
            self.graphs.append(fgm)

            def run(*a):
                if self.first_args is None:
                    self.first_args = list(a)
                return (original if self.use_original else fgm)(*a)

            run._boxed_call = False
            return run

        return aot_autograd(fw_compiler=fw_compiler, decompositions=select_decomp_table(),
                            keep_inference_input_mutations=True)(gm, example_inputs)


def compile_with_pass(module: torch.nn.Module, on_graph: Callable[[fx.GraphModule], fx.GraphModule] | None,
                      *, dynamic: bool = True, pre: Callable[[fx.Graph], Any] | None = None):
    """torch.compile `module` so that every post-grad graph goes through `on_graph` and then runs
    eagerly (as an fx GraphModule). Returns (compiled_callable, capture) where capture.originals and
    capture.graphs hold the post-grad graphs before and after `on_graph`. `pre(graph)` runs first (a
    platform's passes that precede the pass under test); its result is what `originals` hold."""
    cap = _Capture(on_graph, pre)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=cap.backend, dynamic=dynamic, fullgraph=True)
    return compiled, cap


def rebind_token_args(first_args: list[Any], tokens0: torch.Tensor, tokens: torch.Tensor) -> list[Any]:
    """AOT's flat args of a first call with token tensor `tokens0`, re-bound to `tokens`: the token
    tensor is swapped and every int equal to the old token count (the symbolic size) replaced."""
    t0, t = tokens0.shape[0], tokens.shape[0]
    out = []
    for a in first_args:
        if a is tokens0 or (isinstance(a, torch.Tensor) and a.dtype == tokens0.dtype and a.shape == tokens0.shape
                            and torch.equal(a, tokens0)):
            out.append(tokens)
        elif isinstance(a, int) and not isinstance(a, bool) and a == t0:
            out.append(t)
        else:
            out.append(a)
    return out
