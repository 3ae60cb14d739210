"""The user commands, apart from the pass's core: `fxpasses check` (a model through vLLM's engine
with and without the pass: `check`, its platform and baseline helpers `check_platform`,
`check_baseline`, `greedy_compare`, `engine_bench`), the strategy advisor's command (`advise`) and the
random-weight checkpoint writer (`tiny_checkpoints`). `fxpasses.cli` dispatches to them; nothing in
the pass imports this package."""

#: `fxpasses demo` / `dump`: the largest relative error per dtype that still counts as equal (here, not
#: in `demo`, so that the CLI's parser offers these dtypes without importing the demo, which loads vLLM)
DEMO_TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2}
