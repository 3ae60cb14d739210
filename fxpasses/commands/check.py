"""`fxpasses check`: greedy generation in vLLM's real engine without and with the pass, on one
checkpoint (a Hugging Face directory, or a tiny random one made for a named architecture).

Each engine runs in its own subprocess (`python -m fxpasses.commands.check --worker SPEC.json`) with its own
environment: a fresh VLLM_CACHE_ROOT (no cache serves the other run's graph), the platform's own
settings (`fxpasses.commands.check_platform`: VLLM_CPU_OMP_THREADS_BIND on CPU, nothing CPU-specific on CUDA or
NPU, where the same comparison runs that platform's engine), and for the pass run FXPASSES_CONFIG with a dump_dir. The pass run registers `MeasuringPass` (the
vLLM pass, which also measures the bytes each rank sends per step with `fxpasses.comm_volume` on the
graph before and after the rewrite). `run_check` compares the two runs (tokens, chosen-token and
prompt logprobs, a flipped token only at a near-tie: `fxpasses.commands.greedy_compare`), reads the site reports and timings and returns a `CheckResult`; `format_report`
prints it. Exit codes: 0 equal and rewritten, 1 outputs differ (or the pass run failed), 2 bad input
(or the baseline engine cannot run the model), 3 nothing rewritten, 4 the pass moves more bytes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from fxpasses.commands import greedy_compare
from fxpasses.commands.check_platform import CheckPlatform
from fxpasses.config import FxPassesConfig, parse_strategies
from fxpasses.errors import ConfigError

PROMPT_LENS = (1, 2, 3, 4, 7, 8, 13)   # batched together: prefill sums them, decode steps have 7 tokens
SOLO_LENS = (1, 5)                      # also generated alone: T=1 and an odd T on their own
MAX_TOKENS = 8
#: the rewrite reorders the all-reduce's additions (reduce-scatter + all-gather), so logprobs may
#: differ in the last bits; a wrong shard or partial sum moves them by far more
# max |logprob difference| between the runs. bfloat16 keeps 8 bits: a logprob near -5.5 (a tiny random
# model's flat distribution over 256 tokens) moves in steps of 0.03, and a W8A8 kernel that requantises
# an activation one bfloat16 step away moves a few steps; a wrong shard or sum moves it by O(1).
TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-1, "float16": 1e-2}
_KERNEL_RE = re.compile(r"torch\.ops\.(_C\.\w+|vllm\.\w+)")
TOP_K = 5  # logprobs kept per generated token: a flipped greedy choice must be a near-tie within them
BYTES_AT = (256,)                       # token counts at which bytes per step are evaluated
ENGINE_TIMEOUT_S = 900

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT, EXIT_NOTHING_REWRITTEN, EXIT_MORE_BYTES = 0, 1, 2, 3, 4

_COMPILE_RE = re.compile(r"torch\.compile took ([0-9.]+) s in total")
_INIT_RE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s")


@dataclass
class CheckResult:
    exit_code: int
    model: str
    tp: int
    strategies: list[str]
    tokens_equal: bool = False
    max_logprob_diff: float = float("nan")
    tolerance: float = 0.0
    first_divergence: str = ""           # which prompt diverged first, "" when none
    near_ties: list[str] = field(default_factory=list)   # divergences at near-ties (fxpasses.commands.greedy_compare)
    outputs_equal: bool = False          # tokens identical, or diverging only at near-ties
    dtype: str = ""                      # the engines' dtype (--dtype auto: fxpasses.commands.check_platform)
    cpu: str = ""                        # this CPU's kernel family, or the accelerator platform's name
    kernels: list[str] = field(default_factory=list)     # vLLM's custom ops in rank 0's traced graphs
    sites: list[dict] = field(default_factory=list)      # rank 0's site table (every graph)
    rewritten: int = 0                   # sites rewritten (rank 0)
    applied_ranks: list[int] = field(default_factory=list)
    collectives_before: dict = field(default_factory=dict)
    collectives_after: dict = field(default_factory=dict)
    bytes_before: dict = field(default_factory=dict)     # {T: bytes rank 0 sends per step}
    bytes_after: dict = field(default_factory=dict)
    one_time_bytes_after: int = 0        # e.g. FlashComm2's one-time o_proj weight gather
    int8_bytes_after: dict = field(default_factory=dict)  # {T: of bytes_after, those sent as int8}
    bytes_source: str = ""               # "graph" (comm_volume) or why only counts are shown
    bench: dict = field(default_factory=dict)            # --bench: fxpasses.commands.engine_bench.summarise
    compile_s: dict = field(default_factory=dict)        # {"baseline": s, "pass": s} (vLLM's log)
    compile_what: str = ""               # which log line compile_s comes from
    engine_start_s: dict = field(default_factory=dict)   # {"baseline": s, "pass": s}
    pass_ms: dict = field(default_factory=dict)          # rank 0: "total" wall ms of the pass, + report steps
    reasons: list[str] = field(default_factory=list)     # rank 0 report reasons / notes
    message: str = ""                    # the verdict line
    workdir: str = ""
    logs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def _progress(line: str) -> None:
    print(line, flush=True)


def timed_progress(quiet: bool = False) -> Callable[[str], None]:
    """Progress lines with the seconds elapsed since this call (the CLI's), or none (`--quiet`)."""
    if quiet:
        return lambda line: None
    t0 = time.monotonic()
    return lambda line: print(f"[{time.monotonic() - t0:5.0f} s] {line}", flush=True)


SIZE_KEYS = ("hidden_size", "num_hidden_layers")  # named in a sized tiny checkpoint's folder


def resolve_model(model: str | None, arch: str | None, workdir: Path,
                  progress: Callable[[str], None] = _progress, quant: str = "none",
                  shape: dict | None = None) -> Path:
    """The checkpoint directory: `model` checked, or a tiny random one made for `arch` (`quant`:
    W8A8 in compressed-tensors' int8 format, `fxpasses.commands.tiny_checkpoints.QUANTS`; `shape`: config
    overrides of its size)."""
    from fxpasses.commands import tiny_checkpoints as tc

    if quant != "none":
        if arch is None:
            raise ConfigError(f"--quant {quant} makes a tiny quantised checkpoint and goes with --arch; a "
                              "--model checkpoint's own config.json says how it is quantised")
        if quant not in tc.QUANTS or arch not in tc.QUANT_ARCHS:
            raise ConfigError(f"--quant {quant} --arch {arch}: use --quant one of {', '.join(tc.QUANTS)} with "
                              f"--arch one of {', '.join(sorted(tc.QUANT_ARCHS))}")
    if shape and arch is None:
        raise ConfigError("--hidden / --layers size a tiny --arch checkpoint; a --model checkpoint has its own size")
    if (model is None) == (arch is None):
        raise ConfigError("give exactly one of --model DIR (a Hugging Face checkpoint directory) or --arch NAME "
                          f"(a tiny random checkpoint; known: {', '.join(tc.known_archs())})")
    if arch is not None:
        if arch not in tc.CONFIG_CLASSES:
            raise ConfigError(f"unknown --arch {arch!r}; known architectures: {', '.join(tc.known_archs())} "
                              "(or pass --model DIR for your own checkpoint)")
        out = workdir / (f"tiny_{arch}" + ("" if quant == "none" else f"_{quant}")
                         + "".join(f"_{k}{v}" for k, v in sorted((shape or {}).items()) if k in SIZE_KEYS))
        what = arch if quant == "none" else f"{arch} {quant} (compressed-tensors int8)"
        progress(f"[0/2] making a tiny random {what} checkpoint in {out} (nothing downloaded)")
        return tc.make_tiny_model(out, arch, dtype="float32", quant=quant, **(shape or {}))
    p = Path(model).expanduser().resolve()
    if not p.is_dir():
        raise ConfigError(f"--model {model}: no such directory; point --model at a Hugging Face checkpoint "
                          "directory (config.json + *.safetensors), or use --arch NAME for a tiny random one")
    if not (p / "config.json").is_file():
        raise ConfigError(f"--model {model}: no config.json in {p}; point --model at a Hugging Face checkpoint "
                          "directory (the folder holding config.json and the *.safetensors weights), or use "
                          f"--arch NAME for a tiny random checkpoint (known: {', '.join(tc.known_archs())})")
    return p


def pass_config(strategies: str | list[str], tp: int, dump_dir: str | None = None,
                **extra: Any) -> FxPassesConfig:
    """The FxPassesConfig of the pass run, validated for `tp` (ConfigError names the fix)."""
    from fxpasses.strategies.tp_family import TP_GRAPHS

    names = parse_strategies(strategies)
    if not names:
        raise ConfigError(f"--strategy {strategies!r} names no strategy; e.g. --strategy flashcomm1")
    if tp < 2:
        raise ConfigError(f"--tp {tp}: the strategies rewrite tensor-parallel communication; use --tp 2 or more")
    cfg = FxPassesConfig(strategies=names, dump_dir=dump_dir, **extra)
    if cfg.family() is not TP_GRAPHS:
        raise ConfigError(f"fxpasses check runs one tensor-parallel engine; {'+'.join(names)} rewrites "
                          "data-parallel-attention graphs (TP=1 per rank); check it with `fxpasses demo "
                          f"--strategy {'+'.join(names)}` instead")
    cfg.validate_for(tp, tp)
    return cfg


def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    """Deterministic prompt tokens spread over the vocabulary; token 0 avoided."""
    span = max(2, min(vocab, 251) - 1)
    return [1 + (seed * 37 + i * 11) % span for i in range(n)]


# ------------------------------------------------------------------------------------------------
# the measuring pass (created on first use: its base class imports vLLM; PEP 562 so that pickling it
# into vLLM's worker processes finds it as fxpasses.commands.check.MeasuringPass)
# ------------------------------------------------------------------------------------------------
def _make_measuring_pass():
    from fxpasses.vllm_pass import FxPassesInductorPass

    class MeasuringPass(FxPassesInductorPass):
        """The vLLM pass plus bytes per step (fxpasses.comm_volume) on the graph before and after it,
        written to {volume_dir}/rank{r}.jsonl, one line per compiled graph."""

        def __init__(self, volume_dir: str, bytes_at: list[int], tp: int, **overrides: Any):
            super().__init__(**overrides)
            self.volume_dir, self.bytes_at, self.tp = volume_dir, list(bytes_at), tp

        def __call__(self, graph) -> None:
            before = _volumes(graph, self.bytes_at, self.tp)
            t0 = time.perf_counter()
            super().__call__(graph)
            pass_ms = (time.perf_counter() - t0) * 1e3
            after = _volumes(graph, self.bytes_at, self.tp)
            try:
                from fxpasses.context import TPContext
                rank = TPContext.from_vllm().global_rank
            except Exception:
                rank = 0
            out = Path(self.volume_dir)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"before": before, "after": after, "pass_ms": round(pass_ms, 3)}) + "\n")

    MeasuringPass.__module__ = "fxpasses.commands.check"  # also when this file runs as __main__ (the worker)
    MeasuringPass.__qualname__ = "MeasuringPass"
    return MeasuringPass


def __getattr__(name: str):
    if name == "MeasuringPass":
        cls = _make_measuring_pass()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _volumes(graph, bytes_at: list[int], tp: int) -> dict:
    """Per-step and one-time bytes rank sends, at each token count of `bytes_at`; never raises."""
    try:
        from fxpasses import comm_volume as cv
        from fxpasses.report import collective_counts

        vols = cv.collective_volumes(graph, default_group_size=tp)
        syms = cv.token_symbols(graph)
        res: dict[str, Any] = {"counts": collective_counts(graph), "symbols": [str(s) for s in syms], "at": {}}
        for T in bytes_at:
            subs = {s: T for s in syms}  # every free size of the inputs is the token count on vLLM's graphs
            res["at"][str(T)] = cv.totals(vols, subs)
        return res
    except Exception as e:  # measuring must never break the engine
        return {"error": f"{type(e).__name__}: {e}"}


# ------------------------------------------------------------------------------------------------
# the worker (one engine, in its own process)
# ------------------------------------------------------------------------------------------------
def run_engine(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw: dict[str, Any] = dict(model=spec["model"], tensor_parallel_size=spec["tp"], skip_tokenizer_init=True,
                              dtype=spec["dtype"], enforce_eager=False, max_model_len=spec["max_model_len"],
                              max_num_seqs=16, kv_cache_memory_bytes=int(spec["kv_cache_mb"]) << 20, seed=0)
    kw["compilation_config"] = dict(spec.get("compilation") or {})
    if spec.get("measure"):
        m = spec["measure"]
        import fxpasses.commands.check as this  # the importable module (the worker runs as __main__)
        cls = this.MeasuringPass
        kw["compilation_config"]["inductor_compile_config"] = {
            "post_grad_custom_post_pass": cls(m["volume_dir"], m["bytes_at"], spec["tp"])}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    t_start = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=TOP_K,
                        prompt_logprobs=1)
    t1 = time.perf_counter()
    batch = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["batch"]], sp, use_tqdm=False)
    solo = [llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0] for p in spec["solo"]]
    t_gen = time.perf_counter() - t1

    def chosen(o):
        c = o.outputs[0]
        return [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]

    def prompt_lp(o):
        return [None if lp is None else lp[t].logprob for lp, t in zip(o.prompt_logprobs or [], o.prompt_token_ids)]

    def top(o):
        return [{str(t): v.logprob for t, v in lp.items()} for lp in o.outputs[0].logprobs]

    outs = list(batch) + list(solo)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "topk": [top(o) for o in outs],
              "logprobs": [chosen(o) for o in outs], "prompt_logprobs": [prompt_lp(o) for o in outs],
              "engine_start_s": round(t_start, 2), "generate_s": round(t_gen, 2)}
    if spec.get("bench"):
        from fxpasses.commands import engine_bench
        result["bench"] = engine_bench.run_workloads(llm, spec["bench"],
                                                     lambda n, seed: prompt_ids(n, seed, spec["vocab"]))
    return result


def _worker_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[argv.index("--worker") + 1]).read_text())
    out = run_engine(spec)
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
def _engine_env(run_dir: Path, tp: int, fx_config: FxPassesConfig | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FXPASSES_", "VLLM_ASCEND_"))}
    env["VLLM_CACHE_ROOT"] = str(run_dir / "vllm_cache")   # fresh per run: no cache serves the other graph
    env["VLLM_LOGGING_LEVEL"] = env.get("VLLM_LOGGING_LEVEL", "INFO")
    pkg_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if fx_config is not None:
        env["FXPASSES_CONFIG"] = fx_config.key()
    return env


def _baseline(spec: dict, env: dict[str, str] | None, tp: int, run_base: Path, timeout_s: float,
              cache: str | os.PathLike | None, progress: Callable[[str], None]) -> tuple[dict | None, str]:
    """(result or None, log text) of the baseline engine: kept in `cache` for the same checkpoint
    content and engine settings (copied into `run_base` as if it had run there), else run and kept."""
    from fxpasses.commands import check_baseline

    k = check_baseline.key(spec, env) if cache else None
    kept = check_baseline.load(cache, k) if k else None
    if kept:
        base, log_b = kept
        run_base.mkdir(parents=True, exist_ok=True)
        (run_base / "engine.log").write_text(log_b)
        (run_base / "result.json").write_text(json.dumps(base))
        progress(f"      reused the baseline run {k} kept in {cache} (same checkpoint content and engine settings)")
        return base, log_b
    base, log_b, wall_b = _launch("baseline", spec, {**_engine_env(run_base, tp, None), **(env or {})}, run_base,
                                   timeout_s)
    if base is not None:
        progress(f"      done in {wall_b:.0f} s (engine start {base['engine_start_s']:.1f} s)")
        if k:
            check_baseline.store(cache, k, base, run_base / "engine.log")
    return base, log_b


def _launch(name: str, spec: dict, env: dict, run_dir: Path, timeout_s: float) -> tuple[dict | None, str, float]:
    """(result or None, log text, wall seconds) of one engine subprocess."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(run_dir / "result.json")}
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    log_file = run_dir / "engine.log"
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "fxpasses.commands.check", "--worker", str(spec_file)],
                                  cwd=str(run_dir), env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - t0
    text = log_file.read_text(errors="replace")
    if rc is None:
        text += f"\nfxpasses check: the {name} engine did not finish within {timeout_s:.0f} s\n"
    if rc != 0 or not Path(spec["result"]).is_file():
        return None, text, wall
    return json.loads(Path(spec["result"]).read_text()), text, wall


def compile_seconds(log_text: str) -> tuple[float | None, str]:
    """(seconds, what was measured) from vLLM's log: 'torch.compile took X s in total' (the slowest
    worker) where vLLM prints it (GPU); vLLM 0.32's CPU engine does not, and compiles while it warms
    the model up, so there its 'init engine (profile, create kv cache, warmup model) took X s'."""
    vals = [float(x) for x in _COMPILE_RE.findall(log_text)]
    if vals:
        return max(vals), "torch.compile"
    vals = [float(x) for x in _INIT_RE.findall(log_text)]
    if vals:
        return max(vals), "engine init = compile + warmup"
    return None, "not in the log"


def _read_dumps(dump_dir: Path, volume_dir: Path, res: CheckResult) -> None:
    """Site table, counts, timings (rank 0) and bytes per step from the pass run's dump folders."""
    ranks = sorted(dump_dir.glob("rank*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0)
    for rd in ranks:
        reps = [json.loads(f.read_text()) for f in sorted(rd.glob("*.site_report.json"))]
        if not reps and (rd / "site_report.json").is_file():
            reps = [json.loads((rd / "site_report.json").read_text())]
        if any(r.get("applied") for r in reps):
            res.applied_ranks.append(int(rd.name[4:]))
        if rd.name != "rank0" and ranks[0] != rd:
            continue
        for r in reps:
            res.sites.extend(r.get("sites", []))
            for k, v in (r.get("timings_ms") or {}).items():
                if k != "total":
                    res.pass_ms[k] = round(res.pass_ms.get(k, 0.0) + v, 3)
            for side, dst in (("collectives_before", res.collectives_before), ("collectives_after",
                                                                                res.collectives_after)):
                for k, v in (r.get(side) or {}).items():
                    dst[k] = dst.get(k, 0) + v
            if r.get("reason"):
                res.reasons.append(r["reason"])
            res.reasons.extend(f"note: {n}" for n in r.get("notes", []))
    res.rewritten = sum(1 for s in res.sites if s.get("status") == "rewritten")
    if ranks:
        texts = [f.read_text() for f in sorted(ranks[0].glob("*.before.py"))]
        res.kernels = sorted({m for t in texts for m in _KERNEL_RE.findall(t)})
    # bytes per step: rank 0's measured graphs (MeasuringPass), else only the collective counts
    f = volume_dir / "rank0.jsonl"
    lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
    if lines:  # the pass's wall time per graph (the report's total is taken after its dump is written)
        res.pass_ms["total"] = round(sum(d.get("pass_ms", 0.0) for d in lines), 3)
    errors = [d[side]["error"] for d in lines for side in ("before", "after") if "error" in d[side]]
    if lines and not errors:
        for d in lines:
            for side, dst in (("before", res.bytes_before), ("after", res.bytes_after)):
                for T, t in d[side]["at"].items():
                    dst[int(T)] = dst.get(int(T), 0) + t["per_step_send"]
            for T, t in d["after"]["at"].items():
                res.int8_bytes_after[int(T)] = res.int8_bytes_after.get(int(T), 0) + t.get("per_step_send_int8", 0)
            res.one_time_bytes_after += sum(t["one_time_send"] for t in d["after"]["at"].values()) // max(
                1, len(d["after"]["at"]))
        res.bytes_source = "graph (fxpasses.comm_volume on the graph before and after the pass, rank 0)"
        if not res.collectives_before:
            res.collectives_before = dict(lines[0]["before"]["counts"])
            res.collectives_after = dict(lines[0]["after"]["counts"])
    else:
        res.bytes_source = ("collective counts only: " + (f"measuring failed ({errors[0]})" if errors else
                                                          "the pass wrote no volume file (a cache served the "
                                                          "graph, or the pass did not run)"))


@dataclass
class CheckSpec:
    """What one check runs: `run_check`'s arguments (see there)."""

    model_dir: str | os.PathLike | None
    tp: int = 2
    strategies: str | list[str] = "flashcomm1"
    tokens: list[int] | tuple[int, ...] = PROMPT_LENS
    arch: str | None = None
    workdir: str | os.PathLike = "fxpasses-check"
    dtype: str = "auto"
    max_tokens: int = MAX_TOKENS
    tolerance: float | None = None
    bytes_at: list[int] | tuple[int, ...] = BYTES_AT
    config: dict | None = None
    max_model_len: int = 256
    kv_cache_mb: int = 64
    timeout_s: float = ENGINE_TIMEOUT_S
    progress: Callable[[str], None] = _progress
    compilation: dict | None = None
    env: dict[str, str] | None = None
    quant: str = "none"
    bench: int = 0
    shape: dict | None = None
    baseline_cache: str | os.PathLike | None = None
    pass_env: dict[str, str] | None = None
    plain_weights: bool = False
    platform: CheckPlatform | None = None


@dataclass
class _CheckRun:
    """One check under way: its spec, the pass configuration, the engines' spec and environment,
    the work folders and the result being filled."""

    s: CheckSpec
    cfg: FxPassesConfig
    spec: dict
    env: dict
    lens: list[int]
    res: CheckResult
    run_base: Path
    run_pass: Path


def run_check(model_dir: str | os.PathLike | None, tp: int = 2, strategies: str | list[str] = "flashcomm1",
              tokens: list[int] | tuple[int, ...] = PROMPT_LENS, **options) -> CheckResult:
    """Run the baseline and the pass engine on `model_dir` (or a tiny `arch` checkpoint), compare.

    Raises ConfigError for bad input before any engine starts. `config`: further FxPassesConfig
    keys (e.g. {"flashcomm2_oproj_tp_size": 2, "patterns": ["my.toml"]}). `quant` (with `arch`): the
    tiny checkpoint is W8A8 (`fxpasses.commands.tiny_checkpoints.QUANTS`). `platform`: where the engines run
    (default `fxpasses.commands.check_platform.detect()`, vLLM's own answer): its settings, `dtype` "auto"
    (float32 where vLLM's CPU kernels on this CPU accept it, else bfloat16; the checkpoint's half
    dtype or bfloat16 on an accelerator) and limits. `plain_weights`: vLLM's CPU engine keeps its
    linear weights plain (`fxpasses.cpu_plain_weights`, CPU only). `compilation`: vLLM
    compilation_config keys for both engines; `env`: further environment variables for both;
    `pass_env`: for the engine with the pass only (e.g. a debug setting of the pass).
    `bench` N > 0: both engines also run `fxpasses.commands.engine_bench`'s workloads, for N rounds of
    alternating engines (the check's own two engines are round 1). `shape` (with `arch`): the tiny
    checkpoint's size, e.g. `tiny_checkpoints.scaled_shape(1024, 4)`. `baseline_cache` DIR: a
    baseline run of the same checkpoint content and engine settings kept there is reused instead of
    starting the baseline engine, and a new one is kept (`fxpasses.commands.check_baseline`; with `bench`,
    whose engines must alternate, it is a ConfigError). Never raises for engine
    failures: the result's exit_code and message say what happened (log paths in `logs`)."""
    s = _refuse_bad_options(CheckSpec(model_dir, tp, strategies, tokens, **options))
    return _run_engines(_prepare(s))


def _refuse_bad_options(s: CheckSpec) -> CheckSpec:
    """ConfigError for options that cannot run, before anything starts; the spec with room for the
    bench's workloads when it runs them."""
    if s.dtype not in TOLERANCE and s.dtype != "auto":
        raise ConfigError(f"--dtype {s.dtype!r}: use auto or one of {sorted(TOLERANCE)}")
    if not s.tokens or min(s.tokens) < 1:
        raise ConfigError(f"--tokens must be prompt lengths >= 1, got {list(s.tokens)}")
    if s.bench < 0:
        raise ConfigError(f"--bench {s.bench}: give the number of rounds (>= 1), or leave it out")
    if s.bench and s.baseline_cache:
        raise ConfigError("--baseline-cache with --bench: the bench times fresh engines run alternately, "
                          "so a kept baseline cannot stand in for one; drop --baseline-cache (or --bench)")
    if s.bench:
        from fxpasses.commands import engine_bench
        s = replace(s, max_model_len=max(s.max_model_len, engine_bench.max_model_len()),
                    kv_cache_mb=max(s.kv_cache_mb, 256))
    if max(s.tokens) + s.max_tokens > s.max_model_len:
        raise ConfigError(f"--tokens {max(s.tokens)} + {s.max_tokens} generated tokens exceed max_model_len "
                          f"{s.max_model_len}; use shorter prompts")
    return s


def _prepare(s: CheckSpec) -> _CheckRun:
    """The checkpoint, the platform's settings and dtype, the engines' spec; refusals (ConfigError)
    that need the checkpoint or the platform happen here, before any engine starts."""
    workdir = Path(s.workdir).resolve()
    run_base, run_pass = workdir / "baseline", workdir / "pass"
    # the check compares the rewritten model with the original: it forces the rewrite at every token
    # count (min_tokens 0) unless the caller asks for another gate ("auto": a default deployment's)
    cfg = pass_config(s.strategies, s.tp, dump_dir=str(run_pass / "dump"), **{"min_tokens": 0, **(s.config or {})})
    workdir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(None if s.model_dir is None else str(s.model_dir), s.arch, workdir, s.progress, s.quant,
                          s.shape)
    hf = json.loads((model / "config.json").read_text())
    platform = s.platform
    if platform is None:  # vLLM's own answer (imports vLLM: after every cheap refusal)
        from fxpasses.commands import check_platform
        platform = check_platform.detect()
    platform.check_options(s.tp, s.plain_weights)
    from fxpasses import cpu_plain_weights
    env = {**platform.engine_env(s.tp, dict(os.environ)),
           **({cpu_plain_weights.ENV: "1"} if s.plain_weights else {}), **(s.env or {})}
    dtype, why = platform.choose_dtype(hf, s.dtype)
    s.progress(f"      dtype {dtype}: {why} ({platform.describe()})")
    platform.check_fits(model, hf, dtype, s.tp, s.kv_cache_mb)
    vocab = int(hf.get("vocab_size") or (hf.get("text_config") or {}).get("vocab_size") or 256)
    spec = {"model": str(model), "tp": s.tp, "dtype": dtype, "max_model_len": s.max_model_len,
            "kv_cache_mb": s.kv_cache_mb, "max_tokens": s.max_tokens, "compilation": s.compilation or {},
            "batch": [prompt_ids(n, n, vocab) for n in s.tokens],
            "solo": [prompt_ids(n, 100 + n, vocab) for n in SOLO_LENS], "vocab": vocab}
    if s.bench:
        from fxpasses.commands import engine_bench
        spec["bench"] = engine_bench.spec()
    tol = TOLERANCE[dtype] if s.tolerance is None else s.tolerance
    res = CheckResult(EXIT_BAD_INPUT, str(model), s.tp, list(cfg.strategies), tolerance=tol, workdir=str(workdir),
                      dtype=dtype, cpu=platform.family)
    for d in (run_base, run_pass):  # stale dumps / caches would be read as this run's
        if d.exists():
            import shutil
            shutil.rmtree(d)
    return _CheckRun(s, cfg, spec, env, list(s.tokens) + list(SOLO_LENS), res, run_base, run_pass)


def _run_engines(run: _CheckRun) -> CheckResult:
    """The baseline engine (or its kept run), the engine with the pass, the bench rounds, the verdict."""
    s, res, spec, env, tp = run.s, run.res, run.spec, run.env, run.s.tp
    s.progress(f"[1/2] baseline engine (no pass), tp={tp}, {Path(spec['model']).name} ...")
    base, log_b = _baseline(spec, env, tp, run.run_base, s.timeout_s, s.baseline_cache, s.progress)
    res.logs["baseline"] = str(run.run_base / "engine.log")
    if base is None:
        res.message = (f"the baseline engine (without the pass) failed: vLLM cannot run this model here; "
                       f"log {res.logs['baseline']}\n{_tail(log_b)}")
        return res
    s.progress(f"[2/2] engine with {'+'.join(run.cfg.strategies)} ...")
    spec_p = {**spec, "measure": {"volume_dir": str(run.run_pass / "volume"), "bytes_at": list(s.bytes_at)}}
    got, log_p, wall_p = _launch("pass", spec_p, {**_engine_env(run.run_pass, tp, run.cfg), **env,
                                                  **(s.pass_env or {})}, run.run_pass, s.timeout_s)
    res.logs["pass"] = str(run.run_pass / "engine.log")
    (cb, what), (cp, _) = compile_seconds(log_b), compile_seconds(log_p)
    res.compile_s = {"baseline": cb, "pass": cp if got else None}
    res.compile_what = what
    res.engine_start_s = {"baseline": base["engine_start_s"], "pass": got["engine_start_s"] if got else None}
    _read_dumps(run.run_pass / "dump", run.run_pass / "volume", res)
    if got is None:
        res.exit_code = EXIT_DIFFERENT
        res.message = (f"DIFFERENT: the engine with the pass failed (the baseline ran); log {res.logs['pass']}\n"
                       f"{_tail(log_p)}")
        return res
    s.progress(f"      done in {wall_p:.0f} s (engine start {got['engine_start_s']:.1f} s)")
    if s.bench:
        res.bench = _bench_rounds(run, base, got, spec_p)
    cmp = greedy_compare.compare(base, got, run.lens, res.tolerance)
    res.tokens_equal, res.max_logprob_diff, res.first_divergence = (cmp.tokens_equal, cmp.max_logprob_diff,
                                                                    cmp.divergence_to_report)
    res.near_ties, res.outputs_equal = cmp.near_ties, cmp.outputs_equal
    decide(res)
    return res


def _bench_rounds(run: _CheckRun, base: dict, got: dict, spec_p: dict) -> dict:
    """`fxpasses.commands.engine_bench.summarise` over n rounds: round 1 is the check's own two engines, each
    further round starts a baseline engine and then a pass engine (fresh caches, same specs)."""
    from fxpasses.commands import engine_bench

    s, n = run.s, run.s.bench
    rounds = [{"baseline": base.get("bench"), "pass": got.get("bench")}]
    for r in range(2, n + 1):
        row = {}
        sides = (("baseline", run.spec, run.run_base, None), ("pass", spec_p, run.run_pass, run.cfg))
        for side, sp, run_dir, fx in sides:
            d = run_dir / f"bench{r}"
            s.progress(f"      bench round {r}/{n}: {side} engine ...")
            out, _, _ = _launch(f"{side} (bench round {r})", {**sp, "measure": None},
                                {**_engine_env(d, s.tp, fx), **(run.env or {})}, d, s.timeout_s)
            row[side] = out and out.get("bench")
        rounds.append(row)
    summary = engine_bench.summarise(rounds, run.spec["bench"]["workloads"])
    for line in engine_bench.format_rows(summary):
        s.progress("    " + line.strip())
    return summary


def decide(res: CheckResult) -> CheckResult:
    """Set res.exit_code and res.message from the compared outputs, site reports and bytes."""
    tol = res.tolerance
    T = max(res.bytes_before) if res.bytes_before else None
    if not res.outputs_equal or res.max_logprob_diff > tol:
        res.exit_code = EXIT_DIFFERENT
        res.message = ("DIFFERENT: " + (f"greedy tokens diverged ({res.first_divergence})" if not res.outputs_equal
                                        else f"logprobs differ by {res.max_logprob_diff:.3e} > {tol:.0e}"))
    elif res.rewritten == 0 and not res.applied_ranks:
        res.exit_code = EXIT_NOTHING_REWRITTEN
        res.message = ("NOTHING REWRITTEN: outputs equal, but no site was rewritten"
                       + (f" ({'; '.join(res.reasons[:3])})" if res.reasons else
                          " (no site report: the pass did not run)"))
    elif res.collectives_before and res.collectives_before == res.collectives_after:
        # e.g. only column sites marked rewritten (their input gather) while every row site was skipped
        res.exit_code = EXIT_NOTHING_REWRITTEN
        skipped = sorted({s.get("reason", "") for s in res.sites if s.get("status") == "skipped"})
        res.message = ("NOTHING REWRITTEN: outputs equal, but the rewrite left every collective as it was ("
                       + ", ".join(f"{k}: {v} -> {res.collectives_after.get(k, 0)}"
                                   for k, v in res.collectives_before.items() if v)
                       + f"); {res.rewritten} sites are marked rewritten"
                       + (f"; skipped because: {'; '.join(skipped[:3])}" if skipped else ""))
    elif T is not None and res.bytes_after.get(T, 0) > res.bytes_before[T]:
        res.exit_code = EXIT_MORE_BYTES
        res.message = (f"MORE BYTES: outputs equal, but the pass sends {res.bytes_after[T]} bytes per step at "
                       f"T={T} > {res.bytes_before[T]} without it")
    else:
        res.exit_code = EXIT_OK
        ties = (f" up to {len(res.near_ties)} near-tie(s) ({res.near_ties[0]})" if res.near_ties else "")
        res.message = (f"EQUAL: greedy tokens identical{ties}, logprobs within {res.max_logprob_diff:.1e} "
                       f"(tolerance {tol:.0e}); {res.rewritten} sites rewritten")
    return res


def _tail(text: str, n: int = 25) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    return "\n".join("    " + x for x in lines[-n:])


def _fmt_bytes(b: float | int | None) -> str:
    if b is None:
        return "-"
    return f"{int(b):,} B"


def format_report(res: CheckResult) -> str:
    """The printed report: sites, collectives, bytes per step, compile and pass times, verdict."""
    out = [f"model {res.model}  tp={res.tp}  strategies={'+'.join(res.strategies)}  dtype={res.dtype}  "
           f"cpu={res.cpu}"]
    if res.kernels:
        out.append(f"vLLM kernels in the traced graph: {', '.join(res.kernels)}")
    if res.sites:
        w = min(max([len(s.get("prefix", "")) for s in res.sites] + [10]), 60)  # longer ones overflow
        out.append(f"sites (rank 0): {res.rewritten} rewritten of {len(res.sites)}")
        for s in res.sites:
            out.append(f"  {s.get('prefix', ''):<{w}} {str(s.get('class', '')):<28} "
                       f"{str(s.get('strategy') or '-'):<11} {s.get('status', ''):<9} {s.get('reason', '')}")
    elif res.logs.get("pass"):
        out.append("sites (rank 0): no site report was written (the pass did not run on a graph)")
    for r in dict.fromkeys(res.reasons):
        out.append(f"  {r}")
    if res.applied_ranks:
        out.append(f"rewrite applied on ranks {res.applied_ranks}")
    if res.collectives_before:
        kinds = [k for k in res.collectives_before if res.collectives_before[k] or res.collectives_after.get(k)]
        out.append("collectives per step (rank 0): " + ", ".join(
            f"{k}: {res.collectives_before[k]} -> {res.collectives_after.get(k, 0)}" for k in kinds))
    if res.bytes_before:
        for T in sorted(res.bytes_before):
            b, a = res.bytes_before[T], res.bytes_after.get(T)
            ratio = f" ({a / b:.2f}x)" if b else ""
            int8 = res.int8_bytes_after.get(T)
            out.append(f"bytes sent per step per rank at T={T} tokens: before {_fmt_bytes(b)}, after "
                       f"{_fmt_bytes(a)}{ratio}" + (f"; {_fmt_bytes(int8)} of it int8 (W8A8 activations on "
                                                    "the wire)" if int8 else ""))
        if res.one_time_bytes_after:
            out.append(f"one-time bytes (weight gathers) after: {_fmt_bytes(res.one_time_bytes_after)}")
        out.append(f"  (bytes from {res.bytes_source})")
    elif res.bytes_source:
        out.append(f"bytes per step: not measured; {res.bytes_source}")
    if res.compile_s or res.engine_start_s:
        def s(v):
            return "-" if v is None else f"{v:.1f} s"
        out.append(f"vLLM compile time ({res.compile_what}): baseline {s(res.compile_s.get('baseline'))}, "
                   f"with the pass {s(res.compile_s.get('pass'))}; engine start (LLM(...)) "
                   f"{s(res.engine_start_s.get('baseline'))} / {s(res.engine_start_s.get('pass'))}")
    if res.pass_ms:
        parts = ", ".join(f"{k} {v:.0f} ms" for k, v in res.pass_ms.items() if k != "total")
        out.append(f"pass time (rank 0): {res.pass_ms.get('total', 0):.0f} ms wall"
                   + (f" (steps: {parts})" if parts else ""))
    if res.bench:
        from fxpasses.commands import engine_bench
        out.append("throughput (tokens/s), without -> with the pass:")
        out.extend(engine_bench.format_rows(res.bench))
    if res.logs:
        out.append("logs: " + ", ".join(f"{k} {v}" for k, v in res.logs.items()))
    out.append(f"{res.message}  [exit {res.exit_code}]")
    return "\n".join(out)


def main(args) -> int:
    """`fxpasses check` (args from cli.py's parser)."""
    extra: dict[str, Any] = {}
    if args.flashcomm2_oproj_tp_size is not None:
        extra["flashcomm2_oproj_tp_size"] = args.flashcomm2_oproj_tp_size
    if args.patterns:
        extra["patterns"] = args.patterns
    extra["min_tokens"] = args.min_tokens
    if args.lowering is not None:
        extra["lowering"] = args.lowering
    from fxpasses.commands.tiny_checkpoints import scaled_shape
    try:
        shape = scaled_shape(args.hidden, args.layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    res = run_check(args.model, args.tp, args.strategy, args.tokens, arch=args.arch, workdir=args.out,
                    dtype=args.dtype, max_tokens=args.max_tokens, tolerance=args.tolerance,
                    bytes_at=args.bytes_at, config=extra, timeout_s=args.timeout, quant=args.quant,
                    bench=args.bench, shape=shape, baseline_cache=args.baseline_cache,
                    plain_weights=args.cpu_plain_weights,
                    progress=timed_progress(args.quiet))
    print(format_report(res))
    result = json.dumps(res.to_dict(), indent=1, default=str)
    if args.json:
        Path(args.json).write_text(result)
    from fxpasses import html_report
    if html_report.find_dump_dir(Path(res.workdir)) is not None:  # the pass engine wrote its dumps
        print(f"HTML report: {html_report.write_report(res.workdir, check=json.loads(result))}")
    return res.exit_code


if __name__ == "__main__":
    if "--worker" in sys.argv:
        from fxpasses.commands.check import _worker_main as worker  # run in the importable module, not __main__
        sys.exit(worker(sys.argv))
    sys.exit("usage: fxpasses check ... (python -m fxpasses.commands.check --worker SPEC.json runs one engine)")
