import signal

import pytest

from engine.demo import write_demo
from harness.server import Server, assert_no_leaks


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo dataset, written once per test session and shared read-only."""
    path = tmp_path_factory.mktemp("data")
    write_demo(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_dir):
    """One 2-worker fleet shared by a module's read-only tests."""
    srv = Server(tmp_path_factory.mktemp("srv"), demo_dir).start()
    yield srv
    assert srv.stop() == 0
    assert_no_leaks(srv)


@pytest.fixture
def make_server(tmp_path, demo_dir):
    """Start a fleet of one's own; stopped (if still running) and leak-checked afterwards."""
    started = []

    def make(**kwargs) -> Server:
        kwargs.setdefault("data_dir", demo_dir)
        srv = Server(tmp_path / f"s{len(started)}", **kwargs)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        if srv.process is not None:
            srv.stop(signal.SIGTERM)
            assert_no_leaks(srv)
        elif srv.runtime_base.exists():
            srv.runtime_base.rmdir()  # never started: its runtime base stayed empty
