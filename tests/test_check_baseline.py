"""`fxpasses.commands.check_baseline`: a kept baseline run is found again for the same checkpoint content and
engine settings, wherever the checkpoint was written, and never for another checkpoint or setting
(no engine: the reuse inside real engine runs is tests/test_vllm_engine_mutant.py's)."""
import json

from fxpasses.commands import check, check_baseline
from fxpasses.commands.tiny_checkpoints import make_tiny_model


def _spec(model, **kw):
    return {"model": str(model), "tp": 2, "dtype": "float32", "max_model_len": 256, "kv_cache_mb": 64,
            "max_tokens": 8, "compilation": {}, "batch": [[1, 2, 3]], "solo": [[4]], "vocab": 256, **kw}


def test_the_key_follows_the_checkpoint_content_not_its_path(tmp_path):
    a = make_tiny_model(tmp_path / "a", "llama")
    b = make_tiny_model(tmp_path / "b", "llama")
    other_seed = make_tiny_model(tmp_path / "c", "llama", seed=1)
    assert check_baseline.key(_spec(a), None) == check_baseline.key(_spec(b), None)
    assert check_baseline.key(_spec(a), None) != check_baseline.key(_spec(other_seed), None)
    # one changed byte in a weight file is another checkpoint
    w = next(a.glob("*.safetensors"))
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    assert check_baseline.key(_spec(a), None) != check_baseline.key(_spec(b), None)


def test_every_engine_setting_and_the_shared_environment_are_in_the_key(tmp_path):
    m = make_tiny_model(tmp_path / "m", "llama")
    k = check_baseline.key(_spec(m), None)
    for change in ({"tp": 4}, {"dtype": "bfloat16"}, {"max_tokens": 9}, {"batch": [[1, 2, 4]]},
                   {"compilation": {"mode": 3}}, {"kv_cache_mb": 128}):
        assert check_baseline.key(_spec(m, **change), None) != k, change
    assert check_baseline.key(_spec(m), {"FXPASSES_CPU_PLAIN_WEIGHTS": "1"}) != k
    # what belongs to one run only (where the pass engine writes its byte counts) is not a setting
    assert check_baseline.key(_spec(m, measure={"volume_dir": "/x"}, result="/y/result.json"), None) == k


def test_a_kept_run_is_loaded_and_copied_where_the_check_reads_it(tmp_path):
    m = make_tiny_model(tmp_path / "m", "llama")
    spec, cache = _spec(m), tmp_path / "cache"
    k = check_baseline.key(spec, None)
    assert check_baseline.load(cache, k) is None
    run = tmp_path / "first" / "baseline"
    run.mkdir(parents=True)
    (run / "engine.log").write_text("INFO engine log of the first run\n")
    result = {"tokens": [[5, 6]], "engine_start_s": 1.5}
    check_baseline.store(cache, k, result, run / "engine.log")
    lines: list[str] = []
    again = tmp_path / "second" / "baseline"
    base, log = check._baseline(spec, None, 2, again, 1.0, cache, lines.append)
    assert base == result and "first run" in log
    assert json.loads((again / "result.json").read_text()) == result
    assert (again / "engine.log").read_text() == log
    assert any(k in line and "reused" in line for line in lines), lines
