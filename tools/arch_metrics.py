"""The package's shape in numbers: module count, import-graph depth and cycles (every level:
module-level, function-level and TYPE_CHECKING imports), the longest function, the most
parameters, and how often each module is re-entered along the pass's path.

    .venv/bin/python tools/arch_metrics.py              # everything except fxpasses/testing
    .venv/bin/python tools/arch_metrics.py --no-trace   # static numbers only (no pass run)

"Re-entered" counts distinct call edges into a module from a function of another fxpasses
module while `run_passes` rewrites a synthetic 8-layer Llama at TP=8 with each strategy
(`fxpasses.testing.synthetic_graphs`): a module asked the same question from many places shows
a high count.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def package_modules(include_testing: bool = False) -> dict[str, Path]:
    out = {}
    for p in sorted((REPO / "fxpasses").rglob("*.py")):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if include_testing or not name.startswith("fxpasses.testing"):
            out[name] = p
    return out


def _resolve(name: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module a `from ... import` names (relative imports resolved against `name`)."""
    if node.level == 0:
        return node.module
    pkg = name.split(".") if is_package else name.split(".")[:-1]
    pkg = pkg[:len(pkg) - (node.level - 1)]
    return ".".join(pkg + ([node.module] if node.module else []))


def imports(mods: dict[str, Path], *, lazy_only: bool = False) -> dict[str, set[str]]:
    """{module: fxpasses modules it imports, at any level} (or only those imported inside a
    function or under TYPE_CHECKING, with lazy_only)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        top = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top.add(id(node))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or (lazy_only and id(node) in top):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                mod = _resolve(name, path.name == "__init__.py", node)
                if mod is None:
                    continue
                subs = [f"{mod}.{a.name}" for a in node.names]
                # `from pkg import module` depends on the module (and on pkg only for a name of pkg's own)
                targets = subs + ([mod] if any(s not in mods for s in subs) else [])
            for t in targets:
                if t in mods and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def depth(graph: dict[str, set[str]]) -> int:
    """Levels of the import graph (a module with no fxpasses import is level 1); a cycle counts
    as one level."""
    comp_of = {}
    for i, c in enumerate(cycles(graph)):
        for m in c:
            comp_of[m] = f"cycle{i}"
    node = lambda m: comp_of.get(m, m)  # noqa: E731
    dag: dict[str, set[str]] = defaultdict(set)
    for m, ds in graph.items():
        dag[node(m)]
        for d in ds:
            if node(d) != node(m):
                dag[node(m)].add(node(d))
    memo: dict[str, int] = {}

    def lvl(m):
        if m not in memo:
            memo[m] = 1 + max((lvl(d) for d in dag[m]), default=0)
        return memo[m]

    return max(lvl(m) for m in dag)


def functions(mods: dict[str, Path]):
    """(lines, params, 'module:qualname') of every function and method."""
    out = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())

        def walk(node, prefix):
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = ch.args
                    params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                    params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                    out.append((ch.end_lineno - ch.lineno + 1, len(params), f"{name}:{prefix}{ch.name}"))
                    walk(ch, f"{prefix}{ch.name}.")
                elif isinstance(ch, ast.ClassDef):
                    walk(ch, f"{prefix}{ch.name}.")
                else:
                    walk(ch, prefix)

        walk(tree, "")
    return out


def reentries() -> dict[str, int]:
    """{module: distinct call edges into it from other fxpasses modules} along run_passes."""
    import torch
    import torch.fx as fx
    from torch._dispatch.python import enable_python_dispatcher

    from fxpasses.config import FxPassesConfig
    from fxpasses.graph_copy import copy_graph
    from fxpasses.pipeline import run_passes
    from fxpasses.strategies import registry
    from fxpasses.testing.synthetic_graphs import MODELS, build_graph, tp_context

    torch.set_num_threads(1)
    root = str(REPO / "fxpasses")
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)

    def mod_of(code):
        f = code.co_filename
        if not f.startswith(root) or "/testing/" in f:
            return None
        return f[len(REPO.as_posix()) + 1:-3].replace("/", ".").removesuffix(".__init__")

    def prof(frame, event, arg):
        if event != "call":
            return
        callee = mod_of(frame.f_code)
        caller_frame = frame.f_back
        if callee is None or caller_frame is None:
            return
        caller = mod_of(caller_frame.f_code)
        if caller is not None and caller != callee:
            edges[callee].add((f"{caller}:{caller_frame.f_code.co_qualname}", frame.f_code.co_qualname))

    import logging
    logging.getLogger("fxpasses").setLevel(logging.CRITICAL)  # DP strategies: no process group here
    with enable_python_dispatcher():
        gm = build_graph(MODELS["llama70b-8"], 8)
        for strat in registry.registered_names():
            work = fx.GraphModule(gm, copy_graph(gm.graph))
            cfg = FxPassesConfig.from_dict({"strategies": strat})
            sys.setprofile(prof)
            try:
                run_passes(work.graph, cfg, tp_context(8), recompile=False, token_range=(1, 8192))
            finally:
                sys.setprofile(None)
    return {m: len(e) for m, e in edges.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-trace", action="store_true")
    args = ap.parse_args(argv)
    mods = package_modules()
    lines = sum(len(p.read_text().splitlines()) for p in mods.values())
    graph = imports(mods)
    print(f"modules (outside fxpasses/testing): {len(mods)}, {lines} lines")
    print(f"import-graph depth (every level, a cycle = one level): {depth(graph)}")
    cyc = cycles(graph)
    print(f"import cycles at any level: {len(cyc)}" + "".join(f"\n  {' <-> '.join(c)}" for c in cyc))
    fns = functions(mods)
    for lab, key in (("longest functions (lines)", 0), ("most parameters", 1)):
        top = sorted(fns, key=lambda f: -f[key])[:5]
        print(f"{lab}: " + ", ".join(f"{f[2]} {f[key]}" for f in top))
    print(f"functions over 60 lines: {sum(f[0] > 60 for f in fns)}; over 7 parameters: {sum(f[1] > 7 for f in fns)}")
    if not args.no_trace:
        re = sorted(reentries().items(), key=lambda kv: -kv[1])
        print("re-entries along the pass's path (distinct call edges in from other modules): "
              + ", ".join(f"{m} {n}" for m, n in re[:6]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
