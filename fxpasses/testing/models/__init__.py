"""Test models beyond the demo's tiny decoder (`fxpasses.commands.tp_run.tiny_decoder`).

`npu_tiny.py` builds decoders with vllm-ascend's NPU op forms (stand-ins). `hf_checkpoint.py` re-exports `fxpasses.commands.tiny_checkpoints`, which writes
a random-weight Hugging Face checkpoint that vLLM's CPU engine can load (`fxpasses check --arch`, the
engine tests, `tools/make_tiny_llama.py`).
"""
