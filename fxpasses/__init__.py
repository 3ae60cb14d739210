"""fxpasses: torch.fx passes that make vLLM tensor-parallel communication a compiler concern."""
