"""Can vLLM's CPU engine run data-parallel attention here (the deployment OTP and MLP-TP rewrite)?

    .venv/bin/python tools/probe_cpu_dp_engine.py [--arch qwen3_moe] [--dp 2] [--with-pass otp+mlp_tp]

vLLM's own offline recipe for data parallelism (one process per DP rank, each with VLLM_DP_RANK,
VLLM_DP_RANK_LOCAL, VLLM_DP_SIZE, VLLM_DP_MASTER_IP / _PORT set and `LLM(...,
enable_expert_parallel=True)` at tensor_parallel_size 1; vLLM refuses `LLM(data_parallel_size=N)`
in one process) on a tiny random MoE checkpoint, greedy, a few prompts per rank. `--with-pass`
also sets FXPASSES_CONFIG for those strategies. Prints, per rank, the generated tokens or the
exception that stopped it (its last lines), and exits 0 only if every rank generated.

The result on vLLM 0.32's CPU backend is in docs/limits.md ("OTP and MLP-TP in an engine").
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, dp: int, port: int, model: str, cfg: str | None, out: str) -> None:
    os.environ.update(VLLM_DP_RANK=str(rank), VLLM_DP_RANK_LOCAL=str(rank), VLLM_DP_SIZE=str(dp),
                      VLLM_DP_MASTER_IP="127.0.0.1", VLLM_DP_MASTER_PORT=str(port),
                      # the whole list: vLLM's CPU executor takes the DP rank's entry from it
                      VLLM_CPU_OMP_THREADS_BIND="|".join(str(r % (os.cpu_count() or 1)) for r in range(dp)),
                      VLLM_CPU_KVCACHE_SPACE="1")
    if cfg:
        os.environ["FXPASSES_CONFIG"] = cfg
    res: dict = {"rank": rank}
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        llm = LLM(model=model, tensor_parallel_size=1, enable_expert_parallel=True, skip_tokenizer_init=True,
                  dtype="float32", max_model_len=128, max_num_seqs=4, seed=0)
        prompts = [TokensPrompt(prompt_token_ids=[(7 * rank + i) % 200 + 1 for i in range(n)]) for n in (3, 9)]
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        res["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    except BaseException as e:  # noqa: BLE001 - the probe reports whatever stopped the rank
        res["error"] = f"{type(e).__name__}: {e}"
        res["trace"] = traceback.format_exc().splitlines()[-12:]
    Path(out).write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen3_moe", help="tiny MoE checkpoint (fxpasses.commands.tiny_checkpoints)")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--with-pass", default=None, metavar="STRATEGIES", help="e.g. otp+mlp_tp")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    from fxpasses.commands import tiny_checkpoints as tc
    work = Path(tempfile.mkdtemp(prefix="fxpasses-dp-probe-"))
    model = str(tc.make_tiny_model(work / args.arch, args.arch))
    cfg = json.dumps({"strategies": args.with_pass.split("+"), "min_tokens": 0}) if args.with_pass else None
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, args.dp, port, model, cfg, str(work / f"rank{r}.json")))
             for r in range(args.dp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(args.timeout)
        if p.is_alive():
            p.kill()
    ok = True
    for r in range(args.dp):
        f = work / f"rank{r}.json"
        res = json.loads(f.read_text()) if f.is_file() else {"error": f"no result (exit code {procs[r].exitcode})"}
        if "tokens" in res:
            print(f"rank {r}: generated {res['tokens']}")
        else:
            ok = False
            print(f"rank {r}: FAILED {res['error']}")
            for line in res.get("trace", []):
                print(f"    {line}")
    print(f"work folder {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
