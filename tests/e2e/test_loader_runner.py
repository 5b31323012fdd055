"""The e2e loader fixture's contract (tests/e2e/conftest.py `loader_runner`), with stand-in loader scripts so it
runs everywhere (no ../shared, no network): a tool that cannot set itself up (exit 2, e.g. no PyPI on a CI
machine) skips the loader tests; any other set-up failure fails them; after set-up every exit code of the real
run reaches the test."""
from pathlib import Path

import pytest

from tests.e2e.helpers import loader_runner


def _tool(tmp_path: Path, setup_rc: int, run_rc: int) -> Path:
    script = tmp_path / "fake_loader.py"
    script.write_text("import sys\n"
                      f"if '--setup-only' in sys.argv:\n    print('pip: no network'); sys.exit({setup_rc})\n"
                      f"print('vllm-ascend load: ran'); sys.exit({run_rc})\n")
    return script


def test_setup_exit_2_skips(tmp_path):
    run = loader_runner(_tool(tmp_path, setup_rc=2, run_rc=0))
    with pytest.raises(pytest.skip.Exception, match="cannot set itself up.*no network"):
        run(tmp_path)


def test_other_setup_failure_fails(tmp_path):
    run = loader_runner(_tool(tmp_path, setup_rc=1, run_rc=0))
    with pytest.raises(pytest.fail.Exception, match="exited 1"):
        run(tmp_path)


@pytest.mark.parametrize("rc", [0, 1, 2, 3])
def test_after_setup_every_exit_code_reaches_the_test(tmp_path, rc):
    run = loader_runner(_tool(tmp_path, setup_rc=0, run_rc=rc))
    assert run(tmp_path) == (rc, "vllm-ascend load: ran\n")


def test_absent_tool_skips(tmp_path):
    with pytest.raises(pytest.skip.Exception):
        loader_runner(tmp_path / "missing.py")
