"""distributed.split_map: a search's grid split over the ranks, every rank gets one process's list.

Ranks are threads here (tests/helpers.ThreadRanks); the real collectives run in tests/test_distributed.py's 2-
and 4-process compiles (smooth's alpha search goes through split_map).
"""
import threading

import pytest
import torch

from qcompiler import distributed
from tests.helpers import ThreadRanks


@pytest.mark.parametrize("world,n", [(2, 21), (3, 20), (4, 3), (4, 4), (1, 5)])
def test_each_item_computed_once_and_every_rank_gets_one_process_list(monkeypatch, world, n):
    items = [i / 7 for i in range(n)]

    def loss(a):  # float32 values: moved exactly
        return torch.tensor(a, dtype=torch.float32).sin() * 3
    want = [float(loss(a)) for a in items]
    computed, got = [], [None] * world
    lock = threading.Lock()

    def fn(a):
        with lock:
            computed.append(a)
        return loss(a)

    def rank_body(rank, _share):
        got[rank] = distributed.split_map(fn, items)

    ranks = ThreadRanks(world)
    ranks.patch(monkeypatch)
    ranks.run(rank_body, [None] * world)
    assert all(g == want for g in got), got
    assert sorted(computed) == items  # each item once over all ranks, not once per rank
