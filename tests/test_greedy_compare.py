"""`fxpasses.commands.greedy_compare`: a flipped greedy token is accepted only at a near-tie (each run's token
in the other's top-k, in both runs, as vLLM's check_logprobs_close); logprobs are compared over
prompts and the common prefix of each sequence only, and must agree within the tolerance there.
Hand-made outputs with hand-computed expectations."""
from fxpasses.commands.greedy_compare import compare

TOL = 0.05


def _out(tokens, logprobs, topk=None):
    return {"tokens": tokens, "logprobs": logprobs, "prompt_logprobs": [[None, -1.0]] * len(tokens),
            **({"topk": topk} if topk is not None else {})}


def test_identical_outputs_are_equal_and_the_worst_difference_is_measured():
    base = _out([[1, 2, 3]], [[-1.0, -2.0, -3.0]])
    got = _out([[1, 2, 3]], [[-1.0, -2.01, -3.0]])
    c = compare(base, got, [4], TOL)
    assert c.tokens_equal and c.outputs_equal and not c.near_ties
    assert abs(c.max_logprob_diff - 0.01) < 1e-12


def test_a_flip_at_a_near_tie_is_accepted_and_the_rest_of_that_sequence_is_not_compared():
    # position 1: base chose 2 (-2.00) over 7 (-2.02); the pass run chose 7 (-2.00) over 2 (-2.03)
    base = _out([[1, 2, 9]], [[-1.0, -2.0, -0.1]], [[{"1": -1.0}, {"2": -2.0, "7": -2.02}, {"9": -0.1}]])
    got = _out([[1, 7, 4]], [[-1.0, -2.0, -9.0]], [[{"1": -1.0}, {"7": -2.0, "2": -2.03}, {"4": -9.0}]])
    c = compare(base, got, [4], TOL)
    assert not c.tokens_equal and c.outputs_equal
    assert c.near_ties == ["prompt 0 (4 tokens) at generated token 1: [7, 4] != [2, 9] (logprob gap 0.03)"]
    assert c.max_logprob_diff == 0.0  # position 2 (after the flip) is not compared


def test_logprobs_before_a_flip_still_count():
    # the flip at position 1 is a near-tie, but position 0 already differs by 0.5: not within tolerance
    base = _out([[1, 2]], [[-1.0, -2.0]], [[{"1": -1.0}, {"2": -2.0, "7": -2.5}]])
    got = _out([[1, 7]], [[-1.5, -1.9]], [[{"1": -1.5}, {"7": -1.9, "2": -1.95}]])
    c = compare(base, got, [3], TOL)
    assert c.outputs_equal and c.near_ties and abs(c.max_logprob_diff - 0.5) < 1e-12


def test_a_flip_to_a_token_outside_the_other_runs_top_k_fails():
    base = _out([[5]], [[-1.0]], [[{"5": -1.0, "6": -1.01}]])
    got = _out([[8]], [[-1.0]], [[{"8": -1.0, "5": -1.01}]])
    c = compare(base, got, [2], TOL)
    assert not c.outputs_equal and "outside the other run's top-k" in c.unexplained[0]


def test_without_top_k_any_flip_fails_and_a_missing_output_is_never_zipped_away():
    assert not compare(_out([[1]], [[-1.0]]), _out([[2]], [[-1.0]]), [1], TOL).outputs_equal
    c = compare(_out([[1], [2]], [[-1.0], [-1.0]]), _out([[1]], [[-1.0]]), [1, 1], TOL)
    assert not c.outputs_equal and "1 outputs against 2" in c.first_divergence


def test_the_reported_divergence_is_the_first_one_not_explained_by_a_near_tie():
    """Prompt 0 flips at a near-tie, prompt 1 at a token outside the other run's top-k: the check
    reports prompt 1's divergence, and prompt 0's when it is the only one."""
    top = {"5": -0.70, "6": -0.69}
    base = {"tokens": [[5], [1]], "logprobs": [[-0.7], [-0.1]], "prompt_logprobs": [[None], [None]],
            "topk": [[top], [{"1": -0.1}]]}
    got = {"tokens": [[6], [2]], "logprobs": [[-0.69], [-0.2]], "prompt_logprobs": [[None], [None]],
           "topk": [[top], [{"2": -0.2}]]}
    c = compare(base, got, [3, 4], 1e-3)
    assert c.first_divergence.startswith("prompt 0") and c.divergence_to_report.startswith("prompt 1")
    c = compare({**base, "tokens": [[5], [1]]}, {**got, "tokens": [[6], [1]], "logprobs": [[-0.69], [-0.1]]},
                [3, 4], 1e-3)
    assert c.outputs_equal and c.divergence_to_report.startswith("prompt 0")


def test_a_missing_prompt_logprob_is_never_zipped_away():
    base = _out([[1]], [[-1.0]])
    got = _out([[1]], [[-1.0]])
    base["prompt_logprobs"], got["prompt_logprobs"] = [[None, -0.5, -0.25]], [[None, -0.5]]
    c = compare(base, got, [3], TOL)
    assert not c.outputs_equal and "prompt logprobs of lengths [2] against [3]" in c.first_divergence
