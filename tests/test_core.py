import pytest

from edgeslim.core.errors import ConfigError, OutputExistsError
from edgeslim.core.io import atomic_path, write_json, write_text
from edgeslim.core.registry import Registry


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs_are_kept_unless_forced(tmp_path):
    p = write_text(tmp_path / "a.txt", "first")
    with pytest.raises(OutputExistsError, match=r"a\.txt.*already exists.*force"):
        write_text(p, "second")
    assert p.read_text() == "first"
    write_json(p, {"x": 1}, force=True)
    assert p.read_text().strip().startswith("{")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_registry_rejects_duplicates_and_lists_valid_names():
    r: Registry = Registry("widget")
    r.register("alpha")(1)
    r.register("beta")(2)
    with pytest.raises(ValueError, match="already registered"):
        r.register("alpha")(3)
    with pytest.raises(ConfigError, match="unknown widget 'alpah'.*did you mean 'alpha'.*valid: alpha, beta"):
        r.get("alpah")
    assert r.get("beta") == 2 and "alpha" in r and len(r) == 2
