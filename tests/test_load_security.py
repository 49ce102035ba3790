"""Hostile files: gp.load must run nothing a file chooses, and fail only with SerializationError.

Files are crafted here without graphprune's writer (the format is spelled out in
``craft_v2``/``craft_v1``), in both formats: 2 (safetensors, the spec in its metadata,
a SHA-256 over spec and tensors) and 1 (a torch.save zip, still read). Every hostile
target would leave a canary file if it ran; the canary must never appear.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import textwrap

import pytest
import torch

import graphprune as gp

FORMAT = "graphprune-slim"


def digest(text: str, tensors: dict[str, torch.Tensor]) -> str:
    """The format-2 checksum: SHA-256 of the spec text, then each tensor by name: [name, dtype, shape], bytes."""
    h = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def craft_v2(path, spec, tensors, *, text: str | None = None, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    text = json.dumps(spec) if text is None else text
    meta = {"format": FORMAT, "spec": text, "sha256": digest(text, tensors)} if metadata is None else metadata
    save_file(tensors, str(path), metadata=meta)


def craft_v1(path, spec, tensors, *, text: str | None = None) -> None:
    torch.save({"format": FORMAT, "spec": json.dumps(spec) if text is None else text,
                "state_dict": dict(tensors)}, path)


CRAFT = {1: craft_v1, 2: craft_v2}

ALLOWED = textwrap.dedent("""
    import os
    import subprocess
    from os import system

    import torch.nn as nn

    class Net(nn.Module):
        def forward(self, x):
            return x

    def make():
        return Net()
""")


@pytest.fixture(scope="module")
def slim():
    model, x = gp.zoo.create("mlp")
    return gp.prune(model, x, ratio=0.5).model, x


def base_spec(slim_model, version: int) -> dict:
    spec = {"format": FORMAT, "version": version, "origin": {"zoo": "mlp", "kwargs": {}},
            "inputs": [{"shape": [2, 64], "dtype": "float32"}],
            "plans": [slim_model.meta["graphprune"]["plan"]], "training": False}
    if version == 2:
        spec["builds"] = [{}]
    return spec


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A canary path, a victim folder, a module whose import leaves the canary, and a module the tests trust."""
    canary = tmp_path / "canary"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "gp_sec_evil.py").write_text(
        f"open({str(canary)!r}, 'w').close()\nimport torch.nn as nn\n"
        f"class Evil(nn.Module):\n    pass\ndef make():\n    open({str(canary)!r}, 'w').close()\n")
    (lib / "gp_sec_allowed.py").write_text(ALLOWED)
    monkeypatch.syspath_prepend(str(lib))
    for name in ("gp_sec_evil", "gp_sec_allowed"):
        sys.modules.pop(name, None)
    yield canary, victim
    for name in ("gp_sec_evil", "gp_sec_allowed"):
        sys.modules.pop(name, None)


def nothing_ran(env) -> None:
    canary, victim = env
    assert not canary.exists(), "a target chosen by the file ran"
    assert (victim / "keep").exists(), "a target chosen by the file deleted files"
    assert "gp_sec_evil" not in sys.modules, "an untrusted module was imported"


def refused(path, match: str | None = None, trust=("gp_sec_allowed",)) -> gp.SerializationError:
    with pytest.raises(gp.SerializationError, match=match) as info:
        gp.load(path, trust=list(trust))
    return info.value


@pytest.mark.parametrize("version", [1, 2])
def test_crafted_file_of_the_base_spec_loads(slim, tmp_path, version):
    model, x = slim
    CRAFT[version](tmp_path / "ok.gp", base_spec(model, version), model.state_dict())
    assert torch.equal(gp.load(tmp_path / "ok.gp")(*x), model(*x))


def _targets(canary, victim):
    touch = {"command": f"touch {canary}"}
    return [
        ("os:system", touch),
        ("subprocess:run", {"args": ["touch", str(canary)]}),
        ("subprocess:Popen", {"args": ["touch", str(canary)]}),
        ("builtins:open", {"file": str(canary), "mode": "w"}),
        ("shutil:rmtree", {"path": str(victim)}),
        ("os:_exit", {}),
        ("torch:save", {"obj": 1, "f": str(canary)}),
        ("pathlib:Path", {}),
        ("gp_sec_evil:make", {}),                              # importing it is enough
        ("gp_sec_allowed:os.system", touch),                   # chains through a trusted module
        ("gp_sec_allowed:system", touch),                      # a re-export is not defined there
        ("gp_sec_allowed:subprocess.run", {"args": ["touch", str(canary)]}),
        ("gp_sec_allowed:Net.__init__.__globals__", {}),
        ("gp_sec_allowed:Net.__subclasses__", {}),
        ("gp_sec_allowed:Net.mro", {}),
        ("graphprune.zoo:create", {"name": "mlp"}),            # graphprune itself is not trusted for factories
        ("graphprune.cli:main", {"argv": ["zoo"]}),
        ("gp_sec_allowed.__init__:make", {}),
        ("gp_sec_allowed:make()", {}),
    ]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("index", range(19))
def test_dangerous_factories_never_run(slim, env, tmp_path, version, index):
    canary, victim = env
    factory, kwargs = _targets(canary, victim)[index]
    spec = base_spec(slim[0], version)
    spec["origin"] = {"factory": factory, "kwargs": kwargs}
    CRAFT[version](tmp_path / "evil.gp", spec, slim[0].state_dict())
    err = refused(tmp_path / "evil.gp")
    assert str(tmp_path / "evil.gp") in str(err)
    nothing_ran(env)


def test_every_target_is_tested():
    assert len(_targets("c", "v")) == 19


@pytest.mark.parametrize("version, where", [(1, "origin"), (2, "origin"), (2, "builds")])
@pytest.mark.parametrize("leaf", ["os:system", "subprocess:Popen", "builtins:open", "gp_sec_evil:Evil",
                                  "gp_sec_allowed:os.system", "gp_sec_allowed:make", "torch.nn:functional.relu",
                                  "torch:save", "gp_sec_allowed:_private", 3])
def test_dangerous_leaf_module_types_are_refused(slim, env, tmp_path, version, where, leaf):
    spec = base_spec(slim[0], version)
    (spec["origin"] if where == "origin" else spec["builds"][0])["leaf_modules"] = [leaf]
    CRAFT[version](tmp_path / "evil.gp", spec, slim[0].state_dict())
    refused(tmp_path / "evil.gp")
    nothing_ran(env)


def test_trusted_leaf_types_are_allowed(slim, tmp_path):
    spec = base_spec(slim[0], 2)
    spec["builds"][0]["leaf_modules"] = ["torch.nn.modules.linear:Linear"]  # unchanged groups for an MLP
    craft_v2(tmp_path / "ok.gp", spec, slim[0].state_dict())
    assert gp.load(tmp_path / "ok.gp").fc1.out_features == slim[0].fc1.out_features


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("inputs, needle", [
    ([{"shape": [2**22, 2**22], "dtype": "float32"}], "over the limit"),   # 64 TiB
    ([{"shape": [2**40], "dtype": "float64"}], "over the limit"),
    ([{"shape": [2, 64], "dtype": "float32"}] * 2 + [{"shape": [2**31, 2], "dtype": "int64"}], "over the limit"),
    ([{"shape": [1] * 17, "dtype": "float32"}], "at most 16"),
    ([{"shape": [-1, 64], "dtype": "float32"}], "non-negative"),
    ([{"shape": [2.0, 64], "dtype": "float32"}], "non-negative integers"),
    ([{"shape": [True, 64], "dtype": "float32"}], "non-negative integers"),
    ([{"shape": "2,64", "dtype": "float32"}], "shape"),
    ([{"shape": [[2], 64], "dtype": "float32"}], "shape"),
    ([{"dtype": "float32"}], "shape"),
    ([{"shape": [2, 64]}], "dtype"),
    ([], "1 to 64"),
    ([{"shape": [1], "dtype": "float32"}] * 65, "1 to 64"),
    ({"shape": [2, 64], "dtype": "float32"}, "list"),
    (["float32"], "shape"),
])
def test_declared_input_shapes_are_checked_before_allocating(slim, tmp_path, version, inputs, needle):
    spec = base_spec(slim[0], version)
    spec["inputs"] = inputs
    CRAFT[version](tmp_path / "big.gp", spec, slim[0].state_dict())
    refused(tmp_path / "big.gp", needle)


def test_max_bytes_is_the_callers_limit(slim, tmp_path):
    craft_v2(tmp_path / "m.gp", base_spec(slim[0], 2), slim[0].state_dict())
    with pytest.raises(gp.SerializationError, match="over the limit"):
        gp.load(tmp_path / "m.gp", max_bytes=100)  # 2 x 64 float32 inputs take 512 bytes
    assert gp.load(tmp_path / "m.gp", max_bytes=512) is not None


def test_zoo_kwargs_asking_for_a_huge_model_are_refused(slim, tmp_path):
    spec = base_spec(slim[0], 2)
    spec["origin"]["kwargs"] = {"hidden": [2**20, 2**20]}  # a 4 TiB MLP
    craft_v2(tmp_path / "huge.gp", spec, slim[0].state_dict())
    refused(tmp_path / "huge.gp", "would allocate")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", ["float33", "Tensor", "save", "", 3, None, ["float32"], "qint8", "complex32",
                                   "torch.float32", "float32 "])
def test_unknown_input_dtypes(slim, tmp_path, version, dtype):
    spec = base_spec(slim[0], version)
    spec["inputs"][0]["dtype"] = dtype
    CRAFT[version](tmp_path / "d.gp", spec, slim[0].state_dict())
    refused(tmp_path / "d.gp", "dtype")


@pytest.mark.parametrize("version", [1, 2])
def test_tensors_of_the_wrong_dtype_or_shape(slim, tmp_path, version):
    state = dict(slim[0].state_dict())
    for name, value in (("fc1.weight", state["fc1.weight"].to(torch.int64)),
                        ("fc1.weight", state["fc1.weight"].double()),
                        ("fc1.weight", torch.zeros(3, 3)),
                        ("extra", torch.zeros(1))):
        bad = {**state, name: value}
        CRAFT[version](tmp_path / "w.gp", base_spec(slim[0], version), bad)
        refused(tmp_path / "w.gp", "do not fit")
    missing = {k: v for k, v in state.items() if k != "fc1.bias"}
    CRAFT[version](tmp_path / "w.gp", base_spec(slim[0], version), missing)
    refused(tmp_path / "w.gp", "do not fit")


@pytest.mark.parametrize("version", [1, 2])
def test_truncated_files(slim, tmp_path, version):
    CRAFT[version](tmp_path / "full.gp", base_spec(slim[0], version), slim[0].state_dict())
    data = (tmp_path / "full.gp").read_bytes()
    for cut in sorted({0, 1, 4, 7, 8, 9, 30, 200, len(data) // 2, len(data) - 100, len(data) - 1}):
        (tmp_path / "cut.gp").write_bytes(data[:cut])
        refused(tmp_path / "cut.gp")


def test_bit_flipped_files(slim, tmp_path):
    craft_v2(tmp_path / "full.gp", base_spec(slim[0], 2), slim[0].state_dict())
    data = (tmp_path / "full.gp").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    positions = list(range(header_end)) + list(range(header_end, len(data), 97)) + [len(data) - 1]
    for i in positions:
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        (tmp_path / "flip.gp").write_bytes(bytes(flipped))
        with pytest.raises(gp.SerializationError):
            gp.load(tmp_path / "flip.gp")


def _paths(value, prefix=()):
    """Every key path of a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _set(spec, path, value):
    spec = copy.deepcopy(spec)
    if not path:
        return value
    target = spec
    for p in path[:-1]:
        target = target[p]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return spec


_DELETE = object()
_REPLACEMENTS = [None, True, 0, -1, 1.5, "x", [], {}, [None], {"x": None}, 10**30, _DELETE]
# keys whose every other type (or absence) must be refused
_REQUIRED = {("format",), ("origin",), ("origin", "zoo"), ("inputs",), ("inputs", 0), ("inputs", 0, "shape"),
             ("inputs", 0, "dtype"), ("plans",), ("plans", 0), ("builds",), ("version",), ("training",)}


def _accepted_anyway(key: tuple, value) -> bool:
    """Changes that leave a valid file: optional keys dropped, another bool, a build made unknown."""
    if value is _DELETE:
        return key in {("training",), ("builds",), ("version",), ("format",), ("origin", "kwargs")}
    return (key == ("training",) and isinstance(value, bool)) or (key[:1] == ("builds",) and value is None) \
        or (key == ("builds",) and value == [None])


@pytest.mark.parametrize("version", [1, 2])
def test_wrong_json_types_at_every_key(slim, tmp_path, version):
    spec = base_spec(slim[0], version)
    path = tmp_path / "j.gp"
    refusals, accepted = 0, []
    for key in _paths(spec):
        current = spec
        for p in key:
            current = current[p]
        for value in _REPLACEMENTS:
            if value is _DELETE and (not key or isinstance(key[-1], int)):
                continue
            if value is not _DELETE and type(value) is type(current) and value == current:
                continue
            CRAFT[version](path, _set(spec, key, value), slim[0].state_dict())
            try:
                gp.load(path)
            except gp.SerializationError:
                refusals += 1
            else:
                accepted.append((key, value))
    wrong = [(k, v) for k, v in accepted if k in _REQUIRED and not _accepted_anyway(k, v)]
    assert not wrong, f"accepted: {wrong}"
    assert refusals > 100


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("text", ["{", "[]", "null", "1", '"spec"', "[" * 100_000 + "]" * 100_000,
                                  '{"version": NaN}', '{"version": 1e999}', "", "\u00ff" * 10])
def test_malformed_spec_text(slim, tmp_path, version, text):
    CRAFT[version](tmp_path / "t.gp", {}, slim[0].state_dict(), text=text)
    refused(tmp_path / "t.gp")


@pytest.mark.parametrize("metadata", [
    None, {}, {"format": FORMAT}, {"spec": "{}"}, {"format": "other", "spec": "{}", "sha256": ""},
    {"format": FORMAT, "spec": "{}", "sha256": "0" * 64},
])
def test_metadata_that_is_not_ours(slim, tmp_path, metadata):
    craft_v2(tmp_path / "m.gp", {}, slim[0].state_dict(), metadata=metadata)
    refused(tmp_path / "m.gp")


def test_complex_view_notes_are_checked(slim, tmp_path):
    for views in ({"fc1.weight": "complex128"}, {"nosuch": "complex64"}, {"fc1.weight": "float32"}, ["x"]):
        spec = {**base_spec(slim[0], 2), "views": views}
        craft_v2(tmp_path / "v.gp", spec, slim[0].state_dict())
        refused(tmp_path / "v.gp")


def test_format_1_containers_that_are_not_ours(tmp_path):
    for blob in ({"format": FORMAT, "spec": 3, "state_dict": {}},
                 {"format": FORMAT, "spec": "{}", "state_dict": [1]},
                 {"format": FORMAT, "spec": "{}", "state_dict": {"a": 1}},
                 [FORMAT], "text"):
        torch.save(blob, tmp_path / "o.gp")
        refused(tmp_path / "o.gp")


def test_factory_failures_inside_trusted_code_are_serialization_errors(slim, env, tmp_path):
    (tmp_path / "lib" / "gp_sec_raises.py").write_text(
        "def key():\n    raise KeyError('k')\ndef attr():\n    raise AttributeError('a')\n"
        "def typ(**kw):\n    raise TypeError('t')\ndef value():\n    return 3\n")
    try:
        for name in ("key", "attr", "typ", "value"):
            spec = base_spec(slim[0], 2)
            spec["origin"] = {"factory": f"gp_sec_raises:{name}", "kwargs": {}}
            craft_v2(tmp_path / "r.gp", spec, slim[0].state_dict())
            refused(tmp_path / "r.gp", trust=["gp_sec_raises"])
    finally:
        sys.modules.pop("gp_sec_raises", None)


@pytest.mark.parametrize("bad", [3, None, b"bytes", ["a.gp"]])
def test_bad_path_arguments(bad):
    with pytest.raises(gp.SerializationError):
        gp.load(bad)


@pytest.mark.parametrize("trust", ["__main__", [3], ["a b"]])
def test_bad_trust_arguments(slim, tmp_path, trust):
    craft_v2(tmp_path / "ok.gp", base_spec(slim[0], 2), slim[0].state_dict())
    with pytest.raises(gp.SerializationError, match="trust"):
        gp.load(tmp_path / "ok.gp", trust=trust)


def test_the_pickle_in_a_format_1_file_runs_no_code(env, tmp_path):
    canary, _ = env

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    torch.save({"format": FORMAT, "spec": "{}", "state_dict": {}, "x": Evil()}, tmp_path / "p.gp")
    refused(tmp_path / "p.gp", "not a graphprune file")
    nothing_ran(env)
