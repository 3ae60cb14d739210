"""What `fxpasses demo` and `fxpasses dump` run: a tiny dense decoder built from real vLLM layers
(`tiny_decoder`, with the bundled `tiny_llama.json`), its post-grad graph captured through
Dynamo/AOTAutograd with the pass (`capture`), a pool of gloo rank processes with vLLM's distributed
state initialised (`pool`), and the per-rank capture and comparison of the original and rewritten
graphs (`harness`; `dp_harness` for OTP / MLP-TP, each rank on its own tokens). The test suite
runs the same machinery."""
