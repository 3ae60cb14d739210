"""The user commands, apart from the pass's core: `fxpasses check` (a model through vLLM's engine
with and without the pass: `check`, its platform and baseline helpers `check_platform`,
`check_baseline`, `greedy_compare`, `engine_bench`), the strategy advisor's command (`advise`) and the
random-weight checkpoint writer (`tiny_checkpoints`). `fxpasses.cli` dispatches to them; nothing in
the pass imports this package."""
