"""fxpasses as a vLLM compilation pass.

`FxPassesInductorPass` is a vLLM `InductorPass` (a torch `CustomGraphPass`). vLLM hands it the
post-grad ATen graph of the compiled model (on CPU: the whole model, once; on GPU: each piecewise
graph, through vLLM's `PostGradPassManager`). On every call it

1. resolves its configuration: `load_config(additional_config, os.environ)` (see
   `fxpasses.config`; the vLLM config is the one the pass was bound to, else the one vLLM has
   current, else the one of the model being compiled), then any keyword overrides given to the
   constructor;
2. reads the live TP group (`TPContext.from_vllm()`), validates the configuration for it
   (`ConfigError` names the fix) and takes the token range vLLM runs the graph at: its compile
   range, else (one graph for every size) [1, max_num_batched_tokens]; an explicit `min_tokens`
   gates by the range's start, `auto` lets the pipeline judge the rewrite over the range;
3. calls `fxpasses.pipeline.run_passes`, which rewrites the graph in place or leaves it untouched
   and says why (site report under `FXPASSES_DUMP_DIR/rank{r}/`).

`uuid()` covers everything the rewritten graph depends on (resolved configuration, pattern set
contents, tp/rank/world, fxpasses source), so neither Inductor's FX graph cache nor vLLM's AOT
compile cache can serve a graph rewritten under another configuration. A cache *hit* does not run
the pass again (the cached graph already is the rewritten one), so no new dumps appear then.

Three ways to register (docs/deployment.md, "Using it with vLLM"):
  * `compilation_config={"inductor_compile_config": {"post_grad_custom_post_pass": FxPassesInductorPass()}}`
  * `compilation_config={"inductor_passes": {"post_grad_custom_post_pass": "fxpasses.vllm_pass_instance"}}`
  * the `vllm.general_plugins` entry point `fxpasses.plugin:register` (automatic once configured).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from vllm.compilation.passes.inductor_pass import InductorPass

from fxpasses import link_costs, piece_boundaries
from fxpasses.config import FxPassesConfig, load_config
from fxpasses.graph_mode import graph_mode_of

log = logging.getLogger("fxpasses")

_PKG_DIR = Path(__file__).resolve().parent


def _source_digest() -> str:
    """sha256 over fxpasses' own sources and shipped pattern sets (computed once per process)."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        h = hashlib.sha256()
        files = sorted(_PKG_DIR.rglob("*.py")) + sorted(_PKG_DIR.rglob("*.toml"))
        try:
            from fxpasses.patterns_loader import builtin_dir
            files += sorted(Path(builtin_dir()).glob("*.toml"))
        except Exception:  # no shipped patterns dir: the config key still names the sets
            pass
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()
    return _SOURCE_DIGEST


_SOURCE_DIGEST: str | None = None


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version("fxpasses")
    except Exception:
        return "unknown"


def _patterns_digest(cfg: FxPassesConfig) -> str:
    """Contents of the configured pattern sets (user files may change between runs)."""
    try:
        from fxpasses.patterns_loader import load_patterns
        return hashlib.sha256(load_patterns(cfg.patterns).fingerprint().encode()).hexdigest()
    except Exception as e:  # an invalid set fails in __call__ with its own message; keep uuid total
        parts = []
        for p in cfg.patterns:
            path = Path(p)
            parts.append(path.read_text() if path.is_file() else f"unresolved:{p}:{type(e).__name__}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _live_tp() -> dict[str, int] | None:
    """tp / rank / world of the live vLLM groups, or None outside a vLLM worker."""
    try:
        from vllm.distributed import parallel_state as ps
        if ps._TP is None or ps._WORLD is None:
            return None
        from fxpasses.context import TPContext
        ctx = TPContext.from_vllm()
        return {"tp": ctx.tp, "rank": ctx.rank, "global_rank": ctx.global_rank, "world": ctx.world}
    except Exception:
        return None


def find_vllm_config():
    """The VllmConfig the engine is running with, as seen from inside a compile.

    vLLM does not keep its config current while Inductor runs custom passes (the CPU engine
    compiles on the first forward, outside `set_current_vllm_config`), so after the current config
    we look for it on the call stack: the compiled model (`self.vllm_config`) or a `VllmConfig`
    method (`compute_hash`).
    """
    from vllm.config import VllmConfig, get_current_vllm_config_or_none

    vc = get_current_vllm_config_or_none()
    if vc is not None:
        return vc
    f = sys._getframe(1)
    while f is not None:
        s = f.f_locals.get("self")
        if isinstance(s, VllmConfig):
            return s
        try:
            cand = getattr(s, "vllm_config", None) if s is not None else None
        except Exception:  # a property that fails is not the config we look for
            cand = None
        if isinstance(cand, VllmConfig):
            return cand
        f = f.f_back
    return None


_RESOLVED: dict[str, FxPassesConfig] = {}


def _resolve_key(ac: Mapping[str, Any], env: Mapping[str, str], overrides: Mapping[str, Any]) -> str | None:
    try:
        envs = {k: v for k, v in env.items() if k.startswith(("FXPASSES_", "VLLM_ASCEND_"))}
        src = envs.get("FXPASSES_CONFIG", "").strip()
        file_text = None
        if src and not src.startswith("{"):
            p = Path(src)
            file_text = p.read_text() if p.is_file() else None
        return json.dumps([ac, envs, file_text, overrides], sort_keys=True, default=repr)
    except Exception:  # unhashable / unreadable input: do not memoise
        return None


def compile_range_of_current_pass():
    """vLLM's compile range of the graph being compiled (GPU / VLLM_COMPILE mode), or None where
    vLLM compiles one graph for every token count (CPU: DYNAMO_TRACE_ONCE + plain Inductor)."""
    from vllm.compilation.passes import inductor_pass as ip
    ctx = getattr(ip, "_pass_context", None)
    return getattr(ctx, "compile_range", None) if ctx is not None else None


class FxPassesInductorPass(InductorPass):
    """The fxpasses rewrite as a vLLM post-grad custom pass.

    `FxPassesInductorPass()` reads its configuration from vLLM's `additional_config["fxpasses"]`,
    `FXPASSES_CONFIG`, `FXPASSES_DUMP_DIR` and the vllm-ascend switches when the graph is compiled;
    keyword arguments (any `FxPassesConfig` key) override those, e.g.
    `FxPassesInductorPass(strategies=["flashcomm1"], dump_dir="/tmp/fx")`.
    """

    def __init__(self, **overrides: Any):
        if overrides:
            FxPassesConfig.from_dict(overrides)  # fail now on unknown keys / bad values
        self.overrides = dict(overrides)
        self.additional_config: dict[str, Any] | None = None  # set by bind(); travels to workers
        self.tp_size_hint: int | None = None
        # the platform's pass key when it is not Inductor's (vllm-ascend's route sets it): it picks
        # the whole-graph setting the report names for a piece (`fxpasses.graph_mode`)
        self.platform_pass_key: str | None = None
        self.world_size_hint: int | None = None
        self._warned: set[str] = set()

    # -- configuration ----------------------------------------------------------------------
    def bind(self, vllm_config) -> "FxPassesInductorPass":
        """Remember the parts of `vllm_config` the pass reads (pickled with the pass into workers)."""
        ac = getattr(vllm_config, "additional_config", None)
        self.additional_config = dict(ac) if isinstance(ac, Mapping) else {}
        pc = getattr(vllm_config, "parallel_config", None)
        self.tp_size_hint = getattr(pc, "tensor_parallel_size", None)
        self.world_size_hint = (getattr(pc, "world_size_across_dp", None) or getattr(pc, "world_size", None)
                                if pc is not None else None)
        return self

    def _additional_config(self) -> Mapping[str, Any]:
        if self.additional_config is not None:
            return self.additional_config
        vc = find_vllm_config()
        ac = getattr(vc, "additional_config", None) if vc is not None else None
        return ac if isinstance(ac, Mapping) else {}

    def resolve_config(self, env: Mapping[str, str] | None = None) -> FxPassesConfig:
        """The effective configuration (raises ConfigError with the fix for an invalid one).

        Memoised per distinct input (additional_config, the FXPASSES_* / VLLM_ASCEND_* variables and
        the contents of an FXPASSES_CONFIG file, overrides), so vLLM calling uuid() repeatedly does
        not repeat the mapping log lines."""
        env = os.environ if env is None else env
        ac = self._additional_config()
        key = _resolve_key(ac, env, self.overrides)
        if key is not None and key in _RESOLVED:
            return _RESOLVED[key]
        cfg = load_config(ac, env, **self.overrides)
        if key is not None:
            _RESOLVED[key] = cfg
        return cfg

    def validate(self, cfg: FxPassesConfig, tp: int, world: int | None = None) -> None:
        cfg.validate_for(tp, world)

    # -- InductorPass ---------------------------------------------------------------------------
    def uuid(self) -> str:
        cfg = self.resolve_config()
        live = _live_tp()
        if live is not None and cfg.strategies:
            self.validate(cfg, live["tp"], live["world"])
        elif self.tp_size_hint and cfg.strategies:
            self.validate(cfg, self.tp_size_hint, self.world_size_hint)
        state = {
            "pass": type(self).__qualname__,
            "version": _package_version(),
            "source": _source_digest(),
            "config": cfg.key(),
            "patterns": _patterns_digest(cfg),
            # rewritten graphs embed rank-dependent values (pad slices, group names)
            "tp": live,
        }
        if cfg.min_tokens == "auto":  # the constants that decide, calibrated at worker start or fixed
            state["link_costs"] = link_costs.resolve(cfg.link_costs).to_dict()
        if cfg.lowering != "off":  # a fused NPU kernel's comm_mode follows the chip: part of the graph
            from fxpasses.lowering import backends
            state["npu_comm_mode"] = backends.npu_comm_mode(backends.soc_version(), os.environ)
        return InductorPass.hash_dict(state)

    def is_applicable_for_range(self, compile_range) -> bool:
        """vLLM (VLLM_COMPILE mode) asks this per compile range: with an explicit `min_tokens`, apply
        only where every token count of the range reaches it; with `auto` the pass decides from the
        graph it is handed (`fxpasses.token_gate`), so every range is handed over."""
        try:
            cfg = self.resolve_config()
        except Exception:
            return True  # let __call__ raise the configuration error with its message
        start = getattr(compile_range, "start", None)
        if cfg.min_tokens == "auto" or not cfg.min_tokens or start is None:
            return True
        return int(start) >= cfg.min_tokens

    def __call__(self, graph) -> None:
        self.apply(graph)

    def token_range(self, cfg: FxPassesConfig, rng) -> tuple[int, int | None] | None:
        """The token counts vLLM runs the graph being compiled at, for `min_tokens: auto`: its compile
        range, else (one graph for every size) [1, max_num_batched_tokens]; None for an explicit
        `min_tokens`."""
        if cfg.min_tokens != "auto":
            return None
        if rng is not None:
            return int(rng.start), int(rng.end)
        vc = find_vllm_config()
        top = getattr(getattr(vc, "scheduler_config", None), "max_num_batched_tokens", None)
        return 1, int(top) if top else None

    def apply(self, graph):
        """Rewrite `graph` in place; returns the pass report (None when no strategy is configured or
        the compile range is below an explicit `min_tokens`)."""
        from fxpasses.context import TPContext
        from fxpasses.pipeline import run_passes
        from fxpasses.logs import bridge_logging

        bridge_logging()
        cfg = self.resolve_config()
        if not cfg.strategies:
            self._once("nostrat", logging.INFO, "fxpasses: no strategy configured; graph left unchanged")
            return
        ctx = TPContext.from_vllm()
        self.validate(cfg, ctx.tp, ctx.world)
        rng = compile_range_of_current_pass()
        self._log_range(cfg, rng)
        if rng is not None and not self.is_applicable_for_range(rng):
            return
        # Inductor recompiles after post-grad passes; a rank whose rewrite fails must not run its
        # original graph beside peers that run theirs rewritten: it raises
        mode = graph_mode_of(find_vllm_config(), getattr(self, "platform_pass_key", None))
        d = piece_boundaries.LAST_DECISION
        if mode.is_piece and d is not None:
            mode = dataclasses.replace(mode, boundaries=("sharded" if d.shard else "replicated") + f": {d.reason}")
        report = run_passes(graph, cfg, ctx, recompile=False, fail_loudly=True, graph_mode=mode,
                            token_range=self.token_range(cfg, rng))
        if mode.is_piece and not report.applied and piece_boundaries.carries_contract(graph):
            self._once("contract", logging.WARNING, "fxpasses: a piece whose boundaries carry token-sharded "
                       "values (fxpasses.piece_boundaries) was not rewritten (%s): it stays exact, with one "
                       "all-gather per sharded input on top of its all-reduces", report.reason)
        elif mode.is_piece and not report.applied and "bytes per step" in report.reason:
            self._once("piece", logging.WARNING, "fxpasses: %s; %s is kept in its original layout in such "
                       "pieces. For the whole graph set %s", mode.why, "+".join(cfg.strategies),
                       mode.whole_graph_setting)
        statuses: dict[str, int] = {}
        for s in report.sites:
            statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
        log.info("fxpasses: rank %d/%d %s: applied=%s sites=%s%s", ctx.rank, ctx.tp, "+".join(cfg.strategies),
                 report.applied, json.dumps(statuses, sort_keys=True), f" ({report.reason})" if report.reason else "")
        return report

    def _log_range(self, cfg: FxPassesConfig, rng) -> None:
        if cfg.min_tokens == "auto":
            if rng is None:
                self._once("onegraph", logging.INFO,
                           "fxpasses: vLLM compiles one graph for every token count here (no compile ranges on "
                           "this platform/mode); min_tokens=auto: the rewrite is kept only if the cost model "
                           "finds it no slower from 1 token (decode) to max_num_batched_tokens")
            else:
                log.info("fxpasses: compile range %s, min_tokens=auto: rewriting where it pays over the range", rng)
        elif rng is not None:
            if self.is_applicable_for_range(rng):
                log.info("fxpasses: compile range %s, min_tokens=%d: rewriting", rng, cfg.min_tokens)
            else:
                log.info("fxpasses: compile range %s is below min_tokens=%d; graph left unchanged",
                         rng, cfg.min_tokens)
        elif not cfg.min_tokens:
            self._once("onegraph", logging.INFO,
                       "fxpasses: vLLM compiles one graph for every token count here (no compile ranges on "
                       "this platform/mode); min_tokens=0: the rewrite applies to all token counts")
        else:
            self._once("onegraph", logging.WARNING,
                       "fxpasses: vLLM compiles one graph for every token count here (no compile ranges on "
                       "this platform/mode), so min_tokens=%d cannot select sizes at compile time; the "
                       "rewrite applies to all token counts (a graph traced for a fixed size below "
                       "min_tokens is left unchanged)", cfg.min_tokens)

    def _once(self, key: str, level: int, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.log(level, msg, *args)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_warned"] = set()
        return d

    def __repr__(self) -> str:
        return f"FxPassesInductorPass(overrides={self.overrides!r})"


class ChainedInductorPass(InductorPass):
    """Runs several passes in order (the plugin uses it when the user already set another
    `post_grad_custom_post_pass`, so that both run)."""

    def __init__(self, passes: list):
        self.passes = list(passes)

    def __call__(self, graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> str:
        return InductorPass.hash_dict({"chain": [p.uuid() if hasattr(p, "uuid") else repr(p)
                                                 for p in self.passes]})

    def is_applicable_for_range(self, compile_range) -> bool:
        return True


# The target of the string registration route: vLLM resolves
# `inductor_passes={"post_grad_custom_post_pass": "fxpasses.vllm_pass_instance"}` as
# `__import__("fxpasses").__dict__["vllm_pass_instance"]`, so the instance must be an attribute of
# the top-level package: `fxpasses/__init__.py` imports it when vLLM is already loaded, and the
# plugin's `register()` (run by vLLM in every process) sets it otherwise.
vllm_pass_instance = FxPassesInductorPass()
