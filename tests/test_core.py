import dataclasses

import pytest

from edgeslim.core.config import Config
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


@dataclasses.dataclass(frozen=True)
class _Inner(Config):
    bits: int = 8
    names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Outer(Config):
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    maybe: _Inner | None = None


def test_nested_configs_round_trip_and_refuse_other_values():
    cfg = _Outer(inner=_Inner(bits=4, names=("a",)), maybe=_Inner())
    assert cfg.to_dict() == {"inner": {"bits": 4, "names": ["a"]}, "maybe": {"bits": 8, "names": []}}
    assert _Outer.from_dict(cfg.to_dict()) == cfg and _Outer.from_yaml(cfg.to_yaml()) == cfg
    built = _Outer(inner={"bits": 4})  # a mapping (as read from YAML) builds the nested config
    assert built.inner == _Inner(bits=4) and built.maybe is None
    assert _Outer(maybe={}).maybe == _Inner()
    with pytest.raises(ConfigError, match=r"_Outer\.inner: unknown _Inner field 'bit'.*did you mean 'bits'"):
        _Outer.from_dict({"inner": {"bit": 4}})
    with pytest.raises(ConfigError, match=r"_Outer\.inner=4 is not allowed; use a _Inner or a mapping of its fields"):
        _Outer(inner=4)
    with pytest.raises(ConfigError, match=r"_Outer\.maybe is a _Outer; use a _Inner"):
        _Outer(maybe=_Outer())
    with pytest.raises(ConfigError, match=r"_Outer\.inner=None is not allowed"):  # not Optional: None is refused
        _Outer(inner=None)
