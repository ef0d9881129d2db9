import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): small steps are
    latency-bound, and on a loaded host two threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_model():
    """A TinyCNN trained on digits once per session: (model, train, val)."""
    from tiny import trained_tiny_cnn

    return trained_tiny_cnn()


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server for the test session (tests/_postgres.py); ``postgres.new_database(name)``
    gives a fresh database's URL. Skips, saying why, when no server can be started here."""
    from _postgres import NoPostgres, PostgresServer

    try:
        import psycopg  # noqa: F401 - the driver SQLAlchemy uses for postgresql:// URLs
    except ImportError:
        pytest.skip("psycopg is not installed (pip install -e '.[dev]'): no PostgreSQL driver")
    try:
        server = PostgresServer.start()
    except NoPostgres as e:
        pytest.skip(f"no PostgreSQL server could be started: {e}")
    try:
        yield server
    finally:
        server.stop()
