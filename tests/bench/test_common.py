"""bench/common.py: the generated blocks of BENCHMARKS.md and the heavy-job lock every bench script shares."""
import os

import pytest

from tests.helpers import bench_module



def test_replace_block_rewrites_only_between_its_markers(tmp_path):
    common = bench_module("common")
    md = tmp_path / "B.md"
    md.write_text("# T\n\n<!-- a -->\nold a\n<!-- /a -->\n\n<!-- b -->\nold b\n<!-- /b -->\ntail\n")
    assert common.replace_block("<!-- a -->", "<!-- /a -->", "new a\nline 2\n", path=md)
    assert md.read_text() == "# T\n\n<!-- a -->\nnew a\nline 2\n<!-- /a -->\n\n<!-- b -->\nold b\n<!-- /b -->\ntail\n"
    # absent markers: appended under the heading, or nothing without one
    assert not common.replace_block("<!-- c -->", "<!-- /c -->", "x", path=md)
    assert common.replace_block("<!-- c -->", "<!-- /c -->", "x", heading="## C", path=md)
    assert md.read_text().endswith("tail\n\n## C\n\n<!-- c -->\nx\n<!-- /c -->\n")
    assert not common.replace_block("<!-- a -->", "<!-- /a -->", "x", path=tmp_path / "missing.md")


def test_heavy_lock_excludes_a_second_holder_and_honours_held(tmp_path, monkeypatch):
    import fcntl
    common = bench_module("common")
    monkeypatch.setattr(common, "LOCK", str(tmp_path / "lock"))
    monkeypatch.delenv("QC_HEAVY_LOCK_HELD", raising=False)
    with common.HeavyLock() as lock:
        assert not lock.held
        fd = os.open(common.LOCK, os.O_RDONLY)  # a second open file description: flock conflicts as another process'
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    monkeypatch.setenv("QC_HEAVY_LOCK_HELD", "1")
    with common.HeavyLock() as lock:   # the caller holds it for a series: nothing acquired
        assert lock.held and lock.waited == 0.0
