"""Round trips of configuration dataclasses through dicts and TOML."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from skymap.app import config as C
from skymap.stats import estimators as S

HERE = (__name__,)  # trust this test module's classes as well as skymap's


@dataclass(frozen=True, kw_only=True)
class Leaf:
    level: float = 1.0
    name: str = "leaf"
    note: str | None = None


@dataclass(frozen=True, kw_only=True)
class Branch:
    leaves: tuple[Leaf, ...] = ()
    box: int | tuple[int, int] = 64
    tags: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    out: Path | None = None
    clip: S.SigmaClip | None = None
    child: Branch | None = None


@dataclass(frozen=True, kw_only=True)
class Checked:
    n: int = 1

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


def _tree():
    return Branch(
        leaves=(Leaf(level=2.5), Leaf(name="b", note="x")),
        box=(32, 48),
        tags=["a", "b"],
        options={"k": 1, "nested": {"type": "not a class", "v": None}, "inf": float("inf")},
        out=Path("results/run1"),
        clip=S.SigmaClip(sigma_lower=2.0, maxiters=None, stdfunc="mad_std"),
        child=Branch(box=16, clip=None),
    )


STATS_CONFIGS = [
    S.SigmaClip(),
    S.SigmaClip(sigma=2.5, sigma_upper=4.0, maxiters=None, cenfunc="mean"),
    S.Mean(),
    S.Median(),
    S.SExtractorMode(median_factor=3.5),
    S.ModeEstimator(median_factor=2.0, mean_factor=1.0),
    S.MMM(),
    S.BiweightLocation(c=4.5),
    S.StdDev(clip_correction=S.SigmaClip(maxiters=None)),
    S.MADStd(),
    S.BiweightScale(c=8.0, modify_sample_size=True),
]


@pytest.mark.parametrize("obj", STATS_CONFIGS, ids=repr)
def test_stats_configs_round_trip(obj):
    d = C.to_dict(obj)
    assert d["type"].startswith("skymap.stats:")
    assert C.from_dict(d) == obj
    assert C.from_dict(json.loads(json.dumps(d))) == obj
    assert C.loads_toml(C.dumps_toml(obj)) == obj


def test_nested_dataclasses_round_trip_through_dict_json_and_toml():
    tree = _tree()
    d = C.to_dict(tree)
    assert d["type"] == f"{__name__}:Branch"
    assert d["leaves"][0] == {
        "type": f"{__name__}:Leaf",
        "level": 2.5,
        "name": "leaf",
        "note": None,
    }
    assert d["box"] == [32, 48] and d["out"] == "results/run1"
    for back in (
        C.from_dict(d, modules=HERE + ("skymap",)),
        C.from_dict(json.loads(json.dumps(d)), modules=HERE + ("skymap",)),
        C.loads_toml(C.dumps_toml(tree), modules=HERE + ("skymap",)),
    ):
        assert back == tree
        assert isinstance(back.box, tuple) and isinstance(back.leaves, tuple)
        assert isinstance(back.tags, list) and isinstance(back.out, Path)
        assert back.options["nested"]["v"] is None


def test_none_encoding_in_toml_is_readable():
    def keys(text):
        return {ln.split(" = ")[0] for ln in text.splitlines() if " = " in ln and ln[0] != "#"}

    assert "note" not in keys(C.dumps_toml(Leaf()))  # None by default: left out
    text = C.dumps_toml(Branch(leaves=(Leaf(),), child=Branch()))
    assert "note" not in keys(text) and "out" not in keys(text)
    maxiters_none = C.dumps_toml(S.SigmaClip(maxiters=None))
    assert 'maxiters = "none"' in maxiters_none and "__none__" not in maxiters_none
    assert C.loads_toml(maxiters_none) == S.SigmaClip(maxiters=None)
    # files written by 0.1 (the inline-table spelling) still load
    assert C.loads_toml('type = "skymap.stats:SigmaClip"\nmaxiters = { __none__ = true }\n') == (
        S.SigmaClip(maxiters=None)
    )
    # None inside a list or dict is written as an inline table
    mixed = Branch(tags=["a", None], options={"x": None, "y": [None]})
    assert C.loads_toml(C.dumps_toml(mixed), modules=HERE + ("skymap",)) == mixed
    # a hand-written file may use the same spelling, or leave the key out
    hand = f'type = "{__name__}:Leaf"\nlevel = 3\nnote = {{ __none__ = true }}\n'
    assert C.loads_toml(hand, modules=HERE) == Leaf(level=3)
    assert C.loads_toml(f'type = "{__name__}:Leaf"\n', modules=HERE) == Leaf()


def test_dicts_that_look_like_encodings_are_escaped():
    odd = Branch(options={"type": "skymap.stats:SigmaClip", "__none__": True})
    d = C.to_dict(odd)
    assert "__dict__" in d["options"]
    assert C.loads_toml(C.dumps_toml(odd), modules=HERE + ("skymap",)) == odd


def test_numpy_scalars_become_python_numbers():
    obj = Leaf(level=np.float32(0.5))
    d = C.to_dict(obj)
    assert type(d["level"]) is float
    assert C.from_dict(d, modules=HERE) == Leaf(level=0.5)


def test_refuses_classes_outside_skymap():
    with pytest.raises(ValueError, match="refusing to import 'os:PathLike'.*'skymap'"):
        C.from_dict({"type": "os:PathLike"})
    # test classes need an explicit opt-in
    with pytest.raises(ValueError, match="refusing"):
        C.from_dict(C.to_dict(Leaf()))
    nested = {"type": f"{__name__}:Branch", "child": {"type": "subprocess:Popen"}}
    with pytest.raises(ValueError, match=r"child\.type: refusing"):
        C.from_dict(nested, modules=HERE)


def test_errors_name_the_bad_key():
    d = C.to_dict(_tree())
    d["leaves"][1]["colour"] = "red"
    with pytest.raises(ValueError, match=r"leaves\[1\]\.colour: unknown field 'colour'"):
        C.from_dict(d, modules=HERE + ("skymap",))
    bad = C.to_dict(S.SigmaClip())
    bad["cenfunc"] = "mode"
    with pytest.raises(ValueError, match="cenfunc"):
        C.from_dict(bad)
    nested = C.to_dict(Branch(clip=S.SigmaClip()))
    nested["clip"]["sigma"] = -1
    with pytest.raises(ValueError, match=r"^clip: sigma must"):
        C.from_dict(nested, modules=HERE + ("skymap",))
    with pytest.raises(ValueError, match="n must be >= 1"):
        C.from_dict({"type": f"{__name__}:Checked", "n": 0}, modules=HERE)
    with pytest.raises(ValueError, match=r"type: no such class 'skymap.stats:Nope'"):
        C.from_dict({"type": "skymap.stats:Nope"})
    with pytest.raises(ValueError, match="is not a dataclass"):
        C.from_dict({"type": "skymap.stats:sigma_clip"})
    with pytest.raises(ValueError, match="'type' key"):
        C.from_dict({"sigma": 3})
    with pytest.raises(ValueError, match="invalid TOML"):
        C.loads_toml("sigma = = 3")


def test_to_dict_rejects_data_and_names_the_key():
    with pytest.raises(TypeError, match=r"options\.image: cannot save a ndarray"):
        C.to_dict(Branch(options={"image": np.zeros(3)}))
    with pytest.raises(TypeError, match="dict keys must be strings"):
        C.to_dict(Branch(options={1: "a"}))
    with pytest.raises(TypeError, match="dataclass instance"):
        C.to_dict(S.SigmaClip)

    @dataclass(frozen=True)
    class Local:
        x: int = 0

    with pytest.raises(TypeError, match="inside a function"):
        C.to_dict(Local())


def test_save_toml_is_atomic_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "clip.toml"
    clip = S.SigmaClip(sigma=2.0)
    assert C.save_toml(clip, path) == path
    assert C.load_toml(path) == clip
    with pytest.raises(FileExistsError, match="overwrite=True"):
        C.save_toml(S.SigmaClip(sigma=4.0), path)
    assert C.load_toml(path) == clip  # untouched
    C.save_toml(S.SigmaClip(sigma=4.0), path, overwrite=True)
    assert C.load_toml(path) == S.SigmaClip(sigma=4.0)
    assert sorted(os.listdir(tmp_path)) == ["clip.toml"]  # no temporary left behind
    with pytest.raises(TypeError):
        C.save_toml(Branch(options={"a": np.zeros(2)}), tmp_path / "bad.toml")
    assert sorted(os.listdir(tmp_path)) == ["clip.toml"]
    (tmp_path / "broken.toml").write_text("type = ")
    with pytest.raises(ValueError, match="broken.toml: invalid TOML"):
        C.load_toml(tmp_path / "broken.toml")


leaf_strategy = st.builds(
    Leaf,
    level=st.floats(allow_nan=False),
    name=st.text(max_size=10),
    note=st.none() | st.text(max_size=5),
)


@given(
    st.lists(leaf_strategy, max_size=3).map(tuple),
    st.integers(1, 4096) | st.tuples(st.integers(1, 99), st.integers(1, 99)),
    st.dictionaries(st.text(max_size=5), st.none() | st.integers() | st.text(max_size=5)),
)
def test_round_trip_property(leaves, box, options):
    tree = Branch(leaves=leaves, box=box, options=options)
    assert C.loads_toml(C.dumps_toml(tree), modules=HERE + ("skymap",)) == tree
    assert C.from_dict(C.to_dict(tree), modules=HERE + ("skymap",)) == tree


def _default_configs():
    """Every frozen dataclass in skymap that builds from its defaults alone: the
    configurations (results need data, so they are skipped)."""
    import dataclasses
    import importlib
    import pkgutil

    import skymap

    found = []
    for info in pkgutil.walk_packages(skymap.__path__, prefix="skymap."):
        # every module must import: a broken one fails here instead of shrinking the set
        mod = importlib.import_module(info.name)
        for name, obj in sorted(vars(mod).items()):
            if not (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__module__ == mod.__name__
                and obj.__dataclass_params__.frozen
                and not name.startswith("_")
            ):
                continue
            required = [
                f.name
                for f in dataclasses.fields(obj)
                if f.init
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ]
            if not required:  # a result or record needs data: only configurations build
                found.append(obj())
    return found


def test_every_default_skymap_config_round_trips():
    configs = _default_configs()
    assert S.SigmaClip() in configs and S.BiweightScale() in configs
    for obj in configs:
        text = C.dumps_toml(obj)
        assert C.loads_toml(text) == obj, text
        assert C.from_dict(json.loads(json.dumps(C.to_dict(obj)))) == obj
