"""Small dense decoder models assembled from real vLLM layers, for the demo, the CLI and the tests.

`tiny.py` owns the model; `tiny_llama.json` is the bundled HF-style config used by `fxpasses demo`.
"""
