"""A rank stuck in a collective that another rank never issued must fail the call with a clear
error naming the silent rank and showing every rank's Python stack, not hang the suite: `TPPool.run`
waits at most `timeout` seconds."""
import time

import pytest

from fxpasses.commands.tp_run.pool import RankError, TPPool
from helpers import rank_all_reduce_only_on_rank1, rank_id


def test_hung_rank_is_named_and_the_pool_shut_down():
    pool = TPPool(2)
    try:
        assert pool.run(rank_id) == [0, 1]
        pool.timeout = 5.0
        t = time.monotonic()
        with pytest.raises(RankError, match=r"ranks \[1\] did not answer rank_all_reduce_only_on_rank1 within 5 s") as e:
            pool.run(rank_all_reduce_only_on_rank1)
        assert time.monotonic() - t < 60
        # every rank's Python stack is in the error: rank 1 sits in the all_reduce nobody joins
        msg = str(e.value)
        assert "--- rank 0" in msg and "--- rank 1" in msg, msg
        rank1 = msg.split("--- rank 1", 1)[1]
        assert "rank_all_reduce_only_on_rank1" in rank1 and "all_reduce" in rank1, rank1
        assert pool.broken and not any(p.is_alive() for p in pool.procs)
        with pytest.raises(RankError, match="start a new TPPool"):
            pool.run(rank_id)
    finally:
        pool.close()
