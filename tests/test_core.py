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


def _every_config() -> list:
    import dataclasses
    import typing

    import edgeslim
    import edgeslim.devices
    import edgeslim.export._weight_only
    import edgeslim.quantize._qat
    from edgeslim.core.config import Config

    def subs(c):
        for s in c.__subclasses__():
            yield s
            yield from subs(s)

    special = {"TieConfig": {"auto": True}, "Device": None}
    out = []
    for cls in subs(Config):
        if cls.__name__ == "Device":
            out.append(edgeslim.devices.get_device("raspberry-pi-4"))
        else:
            out.append(cls(**special.get(cls.__name__, {})))
    assert len(out) >= 10
    for cfg in out:
        hints = typing.get_type_hints(type(cfg))
        assert all(f.name in hints for f in dataclasses.fields(cfg))
    return out


def test_every_config_refuses_values_of_the_wrong_type():
    import dataclasses
    import typing

    checked = 0
    for cfg in _every_config():
        hints = typing.get_type_hints(type(cfg))
        for f in dataclasses.fields(cfg):
            hint = hints[f.name]
            bad = {
                bool: ["no", 1, None],
                int: ["lots", True, 2.5],
                float: ["fast", False],
                str: [3, ["a"]],
                tuple[str, ...]: ["a,b", [1], [["a"]]],
            }.get(hint, [])
            for value in bad:
                with pytest.raises(ConfigError, match=rf"{type(cfg).__name__}\.{f.name}=") as e:
                    dataclasses.replace(cfg, **{f.name: value})
                assert "expected" in str(e.value)
                checked += 1
            if hint is bool:
                assert getattr(dataclasses.replace(cfg, **{f.name: True}), f.name) is True
    assert checked > 100


def test_config_collections_and_messages_are_bounded():
    from edgeslim.core.config import MAX_ITEMS
    from edgeslim.quantize import QuantConfig

    with pytest.raises(ConfigError, match="at most 10,000"):
        QuantConfig(exclude=tuple(f"m{i}" for i in range(MAX_ITEMS + 1)))
    nested: list = ["x"] * 9
    for _ in range(8):  # 9**9 leaves if printed in full
        nested = [nested] * 9
    with pytest.raises(ConfigError) as e:
        QuantConfig(exclude=nested)
    assert len(str(e.value)) < 400
    assert QuantConfig(exclude=["a", "b"]).exclude == ("a", "b")  # lists still become tuples


def test_yaml_alias_bombs_are_refused_before_they_are_built():
    import time

    from edgeslim.core.config import load_yaml

    levels = "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml("a: &a [x, x, x, x, x, x, x, x, x]\n" + levels)
    assert time.perf_counter() - t0 < 1
    assert load_yaml("a: &a [1, 2]\nb: [*a, *a]\n") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}  # small aliases are fine


def test_publication_is_exclusive_and_stale_temporaries_go(tmp_path):
    import os
    import time

    from edgeslim.core.io import clean_stale_temps

    target = tmp_path / "out.txt"
    with pytest.raises(OutputExistsError, match="another run"):
        with atomic_path(target) as tmp:  # a run that started when the name was free ...
            tmp.write_text("slow")
            write_text(target, "fast")  # ... and one that published first
    assert target.read_text() == "fast" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    old = tmp_path / ".out.txt.abcdefgh.tmp"  # the pattern without a pid: stale after an hour
    old.write_text("x")
    os.utime(old, (time.time() - 7200,) * 2)
    fresh = tmp_path / ".out.txt.zyxwvuts.tmp"
    fresh.write_text("x")
    mine = tmp_path / f".out.txt.{os.getpid()}.abcdefgh.tmp"
    mine.write_text("x")
    assert clean_stale_temps(target) == [old]
    assert fresh.exists() and mine.exists()
