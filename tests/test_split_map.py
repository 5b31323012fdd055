"""distributed.split_map: a search's grid split over the ranks, every rank gets one process's list.

Ranks are threads here (a barrier stands in for gloo's all_gather); the real collectives run in
tests/test_distributed.py's 2- and 4-process compiles (smooth's alpha search goes through split_map).
"""
import threading

import pytest
import torch

from qcompiler import distributed


class _Threads:
    def __init__(self, world):
        self.world, self.local, self.barrier = world, threading.local(), threading.Barrier(world)
        self.slots = [None] * world

    def gather_rows(self, x):
        self.slots[self.local.rank] = x.clone()
        self.barrier.wait()
        out = torch.cat(self.slots)
        self.barrier.wait()
        return out

    def run(self, monkeypatch, fn):
        monkeypatch.setattr(distributed, "world", lambda: self.world)
        monkeypatch.setattr(distributed, "rank", lambda: self.local.rank)
        monkeypatch.setattr(distributed, "gather_rows", self.gather_rows)
        results, errors = [None] * self.world, []

        def body(r):
            self.local.rank = r
            try:
                results[r] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("world,n", [(2, 21), (3, 20), (4, 3), (4, 4), (1, 5)])
def test_each_item_computed_once_and_every_rank_gets_one_process_list(monkeypatch, world, n):
    items = [i / 7 for i in range(n)]
    loss = lambda a: torch.tensor(a, dtype=torch.float32).sin() * 3  # float32 values: moved exactly
    want = [float(loss(a)) for a in items]
    computed = []
    lock = threading.Lock()

    def fn(a):
        with lock:
            computed.append(a)
        return loss(a)

    got = _Threads(world).run(monkeypatch, lambda: distributed.split_map(fn, items))
    assert all(g == want for g in got), got
    assert sorted(computed) == items  # each item once over all ranks, not once per rank
