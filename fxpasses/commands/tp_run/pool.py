"""Real multi-process TP over gloo on CPU: a pool of rank processes that live as long as the pool.

Each worker initialises vLLM's distributed state (`init_distributed_environment` +
`initialize_model_parallel`) over gloo, inside a `VllmConfig` context, then serves calls
`fn(state, *args)` where `fn` is an importable function and `state` a per-process dict for caches
(captured graphs, models). `allreduce_form` picks the TP all-reduce the traced graphs contain:
"c10d" (`_c10d_functional.all_reduce` + `wait_tensor`), "shm" (vLLM's CPU shared-memory
`_C.shm_allreduce`) or "vllm" (`vllm.all_reduce` custom op, as on CUDA/NPU).

Nothing waits forever: the ranks meet through a file store (no port to race for); start-up and
every call wait at most `FXPASSES_POOL_TIMEOUT` seconds (default 300); on expiry every rank's
Python stack (faulthandler, all threads) is collected into the error, and the pool is shut down.
"""
from __future__ import annotations

import faulthandler
import os
import pkgutil
import signal
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

ALLREDUCE_FORMS = ("c10d", "shm", "vllm")

# "module:function" every rank process calls first, before vLLM's distributed state (none by default)
RANK_INIT_ENV = "FXPASSES_RANK_INIT"


def init_vllm_tp(world: int, rank: int, init_method: str, tp: int | None = None, allreduce_form: str = "c10d",
                 ident: str = "fxpasses"):
    """Initialise vLLM's distributed environment on this process (gloo, CPU) and return the
    entered `set_current_vllm_config` context (kept open for the process lifetime). `init_method`:
    torch.distributed's rendezvous, e.g. "file:///tmp/x" or "tcp://127.0.0.1:PORT"."""
    if allreduce_form not in ALLREDUCE_FORMS:
        raise ValueError(f"allreduce_form must be one of {ALLREDUCE_FORMS}, got {allreduce_form!r}")
    # same identity on all ranks -> vLLM's shared-memory all-reduce; distinct -> torch.distributed
    os.environ["VLLM_DIST_IDENT"] = ident if allreduce_form == "shm" else f"{ident}-r{rank}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import get_tp_group

    ctx = set_current_vllm_config(VllmConfig())
    ctx.__enter__()
    init_distributed_environment(world, rank, distributed_init_method=init_method, local_rank=rank,
                                 backend="gloo")
    initialize_model_parallel(tensor_model_parallel_size=tp or world)
    if allreduce_form == "vllm":
        g = get_tp_group()
        g.use_custom_op_call = True
        # vLLM's CPU communicator all-reduces in place and returns its input, which a custom op may
        # not do (torch rejects the alias, and Inductor gave wrong results with it): clone first.
        out_place = g._all_reduce_out_place
        g._all_reduce_out_place = lambda x: out_place(x.clone())
    return ctx


def _worker(rank: int, world: int, init_method: str, conn, setup: dict):
    """One rank process: vLLM's distributed state, then the functions the pool sends, until closed.
    `setup`: allreduce_form, ident, tp and stack_file (see `TPPool`)."""
    allreduce_form, ident, tp, stack_file = (setup["allreduce_form"], setup["ident"], setup["tp"],
                                            setup["stack_file"])
    state: dict[str, Any] = {"rank": rank, "world": world, "allreduce_form": allreduce_form}
    if stack_file:  # SIGUSR1 -> every thread's Python stack into this file (read by the parent on a hang)
        state["stack_fh"] = open(stack_file, "w")
        faulthandler.register(signal.SIGUSR1, file=state["stack_fh"], all_threads=True)
    try:
        hook = os.environ.get(RANK_INIT_ENV)
        if hook:  # e.g. the test suite's mutation harness, which patches the library in every rank
            pkgutil.resolve_name(hook)()
        state["vllm_ctx"] = init_vllm_tp(world, rank, init_method, tp=tp, allreduce_form=allreduce_form, ident=ident)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            conn.send(("ok", fn(state, *args, **kwargs)))
        except BaseException as e:  # report, keep serving
            conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    # closed: leave at once. An orderly interpreter exit tears down gloo and vLLM's distributed state
    # rank by rank, each waiting on the others, and held `close()` in join for ~10 s per pool
    if "stack_fh" in state:
        state["stack_fh"].close()
    conn.close()
    os._exit(0)


class RankError(RuntimeError):
    pass


class TPPool:
    """`world` gloo ranks in spawned processes; `pool.run(fn, *args)` returns one result per rank.
    `tp`: vLLM's TP size (default: the world); tp=1 gives DP-attention ranks (OTP / MLP-TP)."""

    #: seconds start-up or a call may take on a rank before the pool is declared hung
    timeout = float(os.environ.get("FXPASSES_POOL_TIMEOUT", "300"))
    broken = False

    def __init__(self, world: int, allreduce_form: str = "c10d", tp: int | None = None):
        self.world, self.allreduce_form, self.tp = world, allreduce_form, tp
        ctx = mp.get_context("spawn")
        self.tmp = tempfile.TemporaryDirectory(prefix="fxpasses-pool-")
        init_method = f"file://{Path(self.tmp.name) / 'rendezvous'}"
        ident = f"fxp-{uuid.uuid4().hex[:8]}"
        self.conns, self.procs, self.stack_files = [], [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            stack_file = str(Path(self.tmp.name) / f"rank{r}.stack")
            setup = {"allreduce_form": allreduce_form, "ident": ident, "tp": tp, "stack_file": stack_file}
            p = ctx.Process(target=_worker, args=(r, world, init_method, child, setup), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
            self.stack_files.append(stack_file)
        errs = self._collect("start-up")
        bad = [e for s, e in errs if s != "ok"]
        if bad:
            self.close()
            raise RankError(f"rank initialisation failed:\n{bad[0]}")

    def _collect(self, what: str) -> list:
        """One answer per rank within `timeout`, else RankError with every silent rank's stack."""
        deadline = time.monotonic() + self.timeout
        res = []
        for r, c in enumerate(self.conns):
            if not c.poll(max(deadline - time.monotonic(), 0.0)):
                silent = [q for q, cc in enumerate(self.conns[r:], r) if not cc.poll(0)]
                stacks = self.stacks()
                self.broken = True
                self.close()
                raise RankError(f"ranks {silent} did not answer {what} within {self.timeout:.0f} s: most likely "
                                "waiting in a collective another rank never issued (or raise "
                                "FXPASSES_POOL_TIMEOUT); the pool was shut down. Python stacks of every rank:\n"
                                + stacks)
            res.append(c.recv())
        return res

    def stacks(self) -> str:
        """Every live rank's Python stack (all threads), via faulthandler on SIGUSR1."""
        for p in self.procs:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGUSR1)
                except OSError:
                    pass
        time.sleep(1.0)
        out = []
        for r, f in enumerate(self.stack_files):
            try:
                text = Path(f).read_text()
            except OSError:
                text = ""
            out.append(f"--- rank {r} (pid {self.procs[r].pid}) ---\n{text.strip() or '(no stack written)'}")
        return "\n".join(out)

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> list[Any]:
        if self.broken:
            raise RankError("this pool was shut down after a hang; start a new TPPool")
        for c in self.conns:
            c.send((fn, args, kwargs))
        res = self._collect(getattr(fn, "__name__", str(fn)))
        errs = [(r, v) for r, (s, v) in enumerate(res) if s != "ok"]
        if errs:
            r, v = errs[0]
            raise RankError(f"rank {r} failed: {v}")
        return [v for _, v in res]

    def close(self):
        for c in self.conns:
            try:
                c.send(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
