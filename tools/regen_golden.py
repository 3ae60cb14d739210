"""Regenerate tests/golden/ (the before/after graph text of the bundled tiny model, TP=2, rank 0).
Run only after reading the diff of the new text: the golden files are the reviewed rewrite."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fxpasses.commands.tp_run.pool import TPPool  # noqa: E402
from helpers import bundled_spec, capture  # noqa: E402
from test_fc1_structure import GOLDEN, _normalise  # noqa: E402

if __name__ == "__main__":
    with TPPool(2, "c10d") as pool:
        s = capture(pool, bundled_spec())[0]
    for which in ("before", "after"):
        (GOLDEN / f"tiny_llama_tp2_rank0.{which}.txt").write_text(_normalise(s[which]))
    print("wrote", GOLDEN)
