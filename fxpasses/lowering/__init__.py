"""Lowering: matmul + collective pairs of a (rewritten or plain TP) graph -> one fused kernel.

Modules, each owning one thing:

* `ops`       the `fxpasses::` ops lowered graphs call (CPU reference fused ops, the rank-0 bias),
              registered at `import fxpasses` through `fxpasses.runtime_ops`;
* `groups`    HCCL communicator names and symmetric-memory groups, recorded at worker start;
* `match`     finding the pairs (matmul -> all_reduce, matmul -> [pad] -> reduce_scatter,
              all_gather -> [unpad] -> matmul) and reading matmul operands;
* `backends`  the backends as records (reference, npu, cuda): ops, refusals, emission;
* `lower`     the step itself (backend choice from the `lowering` key, surgery, per-site record).

See docs/deployment.md ("Lowering"). The package imports nothing itself: `fxpasses.runtime_ops` imports `ops`
at `import fxpasses`, and the step is `fxpasses.lowering.lower` (imported by the pipeline).
"""
