"""The `graphprune` command end to end: `python -m graphprune ...` in a subprocess.

The end-to-end runs start together (one process each) to keep the suite fast; bad
input is checked both through subprocesses (no traceback reaches the user) and
in-process through ``cli.main`` (exit status and the one message line).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import graphprune as gp
from graphprune import cli

REPO = Path(__file__).resolve().parents[1]

TINY = textwrap.dedent("""
    import torch
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.c1 = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.c2 = nn.Conv2d(width, 4, 1)

        def forward(self, x):
            return self.c2(torch.relu(self.bn(self.c1(x))))

    def make(width=8):
        torch.manual_seed(0)
        return Tiny(width).eval()

    def make_with_inputs():
        return make(), (torch.randn(2, 3, 8, 8),)
""")


def _env(extra: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(extra), str(REPO), env.get("PYTHONPATH", "")])
    env.pop("GRAPHPRUNE_DEBUG", None)
    env["OMP_NUM_THREADS"] = "1"  # tiny models: spinning OpenMP threads only slow a busy machine down
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every end-to-end command at once; wait for all; map name -> (rc, out, err, dir)."""
    work = tmp_path_factory.mktemp("cli")
    (work / "tinynet_cli.py").write_text(TINY)
    commands = {
        "prune": ["prune", "resnet20", "--ratio", "0.5", "--out", "r20.gp", "--report", "rep",
                  "--repeats", "2"],
        "import": ["prune", "tinynet_cli:make", "--input-shape", "2,3,8,8", "--kwargs", '{"width": 6}',
                   "--ratio", "0.5", "--out", "tiny.gp", "--repeats", "1"],
        "demo": ["demo", "--model", "mlp", "--repeats", "2", "--out-dir", "demo_out"],
        "bad_model": ["inspect", "nosuchmodel"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "graphprune", *argv], cwd=work, env=_env(work),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in commands.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = (p.returncode, out, err)
    return work, results


def _ok(runs, name):
    work, results = runs
    rc, out, err = results[name]
    assert rc == 0, f"{name}: rc={rc}\nstdout:\n{out}\nstderr:\n{err}"
    return work, out


def test_zoo_lists_models_with_parameter_counts(capsys):
    assert cli.main(["zoo"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line.strip() and "," in line[:40]}
    for name in ("resnet20", "resnet56", "mlp", "mini_resnet18"):
        assert rows[name] == f"{gp.zoo.param_count(name):,}"
    assert rows["mini_resnet18"] == "703,386" and "resnet18" not in rows
    assert "resnet18 -> mini_resnet18" in out  # former names are listed as such


def test_inspect_prints_groups_and_writes_dot_json_svg_html(tmp_path, capsys):
    dot, js, svg, page = tmp_path / "g.dot", tmp_path / "g.json", tmp_path / "out" / "g.svg", tmp_path / "g.html"
    assert cli.main(["inspect", "mlp", "--dot", str(dot), "--json", str(js), "--svg", str(svg),
                     "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "prunable" in out and "reaches a model output" in out
    assert dot.read_text().startswith("digraph layers {") and "fc1 -> " not in dot.read_text()
    groups = json.loads(js.read_text())
    assert [g["size"] for g in groups] == [128, 64, 10]
    drawing = svg.read_text()  # no Graphviz needed: the layer graph, drawn by graphprune
    assert drawing.startswith("<svg") and drawing.count('class="node layer') == 3
    assert page.read_text().count('<li class="group') == 3


def test_inspect_full_names_producers_and_consumers(capsys):
    assert cli.main(["inspect", "resnet56", "--full"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("0 "))
    producers, consumers = row.split("yes", 1)[1].split(" -> ")
    assert producers.split(",")[0].strip() == "conv1"
    assert "layer1.8.conv2" in producers and "layer2.0.shortcut.0" in consumers  # none cut
    assert "..." not in out and "bn1.bias" not in out
    assert len(row) > 300


def _sizes(out: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\d+\s+(\d+)\s", out, re.MULTILINE)]


def test_inspect_factor_heads(capsys):
    assert cli.main(["inspect", "mini_vit", "--full"]) == 0
    assert _sizes(capsys.readouterr().out)[1] == 16  # per-head dims of 4 heads
    assert cli.main(["inspect", "mini_vit", "--full", "--factor", "heads"]) == 0
    assert _sizes(capsys.readouterr().out)[1] == 4  # whole heads


def _prune_to(tmp_path, *flags: str) -> torch.nn.Module:
    out = tmp_path / f"m{abs(hash(flags))}.gp"
    assert cli.main(["prune", *flags, "--repeats", "0", "--out", str(out)]) == 0
    return gp.load(out)


def test_selection_flags_reach_gp_prune(tmp_path, capsys):
    model, x = gp.zoo.create("resnet20")
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]

    def widths(slim):
        return [slim.get_submodule(n).out_channels for n in convs]

    base = widths(_prune_to(tmp_path, "resnet20", "--ratio", "0.4"))
    rounded = widths(_prune_to(tmp_path, "resnet20", "--ratio", "0.4", "--round-to", "8"))
    assert any(w % 8 for w in base) and all(w % 8 == 0 for w in rounded)
    glob = widths(_prune_to(tmp_path, "resnet20", "--ratio", "0.4", "--scope", "global"))
    assert glob != base  # one ranking over all groups, not the same fraction of each
    kept = widths(_prune_to(tmp_path, "resnet20", "--ratio", "0.9", "--min-keep", "6"))
    assert min(kept) == 6
    ignored = _prune_to(tmp_path, "resnet20", "--ratio", "0.5", "--ignore", "layer1.0.conv1", "0")
    assert ignored.get_submodule("layer1.0.conv1").out_channels == 16 and ignored.conv1.out_channels == 16
    assert ignored.get_submodule("layer1.1.conv1").out_channels == 8
    stepped = _prune_to(tmp_path, "mlp", "--ratio", "0.5", "--steps", "2")
    assert len(stepped.meta["graphprune"]["plans"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("flags, key, widths", [
    (["--max-ratio", "0.3"], "max_ratio", (90, 45)),  # at most 30 % of each layer goes
    (["--ratios", "fc1=0.25", "--ratios", "fc2=0.0"], "ratios", (96, 64)),
    (["--factor", "heads"], "factor", (64, 32)),  # the MLP has no heads: the same as without
    (["--uniform"], "uniform", (64, 32)),  # no repeated blocks: the same as without
])
def test_flags_that_need_a_newer_gp_prune(flags, key, widths, tmp_path, capsys):
    """--max-ratio, --ratios and --factor reach gp.prune when it takes max_ratio / ratios / factor;
    else the command stops with one clear line (never ignores them)."""
    out = tmp_path / "m.gp"
    rc = cli.main(["prune", "mlp", "--ratio", "0.5", "--repeats", "0", "--out", str(out), *flags])
    err = capsys.readouterr().err
    if key in inspect.signature(gp.prune).parameters:
        assert rc == 0, err
        slim = gp.load(out)
        assert (slim.fc1.out_features, slim.fc2.out_features) == widths
    else:
        assert rc == 1 and err.count("\n") == 1 and not out.exists()
        assert f"{flags[0]} needs gp.prune({key}=...), which this version of graphprune" in err


def test_uniform_gives_repeated_blocks_one_width(tmp_path, capsys):
    def conv1_widths(slim):
        return [{slim.get_submodule(f"layer{s}.{b}.conv1").out_channels for b in range(3)} for s in (1, 2, 3)]

    ranked = _prune_to(tmp_path, "resnet20", "--ratio", "0.5", "--scope", "global")
    assert any(len(w) > 1 for w in conv1_widths(ranked))  # one ranking: blocks of a stage differ
    uniform = _prune_to(tmp_path, "resnet20", "--ratio", "0.5", "--scope", "global", "--uniform")
    assert all(len(w) == 1 for w in conv1_widths(uniform))
    capsys.readouterr()


def test_checkpoint_loads_trained_weights(tmp_path, capsys):
    model, x = gp.zoo.create("mlp")
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    trained["fc1.weight"][:, :] = 0.0
    trained["fc1.weight"][:10] = 1.0  # only ten rows with any magnitude
    torch.save(trained, tmp_path / "w.pt")
    slim = _prune_to(tmp_path, "mlp", "--ratio", "0.5", "--checkpoint", str(tmp_path / "w.pt"))
    assert slim.fc1.out_features == 64 and int((slim.fc1.weight.abs().sum(1) > 0).sum()) == 10
    torch.save({"fc1.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    assert cli.main(["inspect", "mlp", "--checkpoint", str(tmp_path / "bad.pt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit MLP" in err and "wrong shape (fc1.weight" in err


def test_unwritable_outputs_are_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv in (["prune", "mlp", "--report", str(blocker / "rep")], ["prune", "mlp", "--out", str(blocker / "m.gp")],
                 ["inspect", "mlp", "--html", str(blocker / "g.html")], ["inspect", "mlp", "--svg", str(tmp_path)],
                 ["prune", "mlp", "--report", "/proc/graphprune/rep"]):
        assert cli.main([*argv, "--repeats", "0"] if argv[0] == "prune" else argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("graphprune: error: --") and "cannot write there" in err, err
        assert "internal error" not in err


def test_an_os_error_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    def fail(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "rep" / "report.json"))

    monkeypatch.setattr("graphprune.report.write_report", fail)
    assert cli.main(["prune", "mlp", "--report", str(tmp_path / "rep"), "--repeats", "0"]) == 1
    err = capsys.readouterr().err
    assert err == f"graphprune: error: {tmp_path / 'rep' / 'report.json'}: Permission denied\n"


def test_closed_pipe_ends_quietly_with_sigpipe_status(tmp_path):
    """``graphprune inspect ... | head -1``: no traceback, no internal error, status 141."""
    proc = subprocess.Popen([sys.executable, "-m", "graphprune", "inspect", "resnet56", "--full"], cwd=tmp_path,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before the output comes (head -1 with more than a pipe's worth)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_prune_saves_model_and_report(runs):
    work, out = _ok(runs, "prune")
    assert "parameters" in out and "MACs" in out and "latency" in out
    slim = gp.load(work / "r20.gp")
    model, x = gp.zoo.create("resnet20")
    assert gp.count(slim, x).params < gp.count(model, x).params
    report = json.loads((work / "rep" / "report.json").read_text())
    assert report["method"] == "magnitude" and report["settings"]["ratio"] == 0.5
    assert report["params"]["after"] == gp.count(slim, x).params
    assert report["latency_s"]["before"] > 0 and report["latency_s"]["after"] > 0
    assert sum(g["removed"] for g in report["groups"]) == report["summary"]["removed_channels"] > 0
    assert all(g["kept"] + g["removed"] == g["channels"] for g in report["groups"])
    md = (work / "rep" / "report.md").read_text()
    assert "| parameters |" in md and "## Groups" in md
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (work / "rep" / "widths.png").exists() == has_mpl


def test_prune_import_spec(runs, monkeypatch):
    work, out = _ok(runs, "import")
    monkeypatch.syspath_prepend(str(work))
    with pytest.raises(gp.SerializationError, match="not trusted"):
        gp.load(work / "tiny.gp")
    slim = gp.load(work / "tiny.gp", trust=["tinynet_cli"])
    assert slim.c1.out_channels == 3
    assert slim.meta["graphprune"]["origin"] == {"factory": "tinynet_cli:make", "kwargs": {"width": 6}}
    assert slim(torch.randn(2, 3, 8, 8)).shape == (2, 4, 8, 8)


def test_import_spec_with_example_inputs_needs_no_shape(runs, capsys, monkeypatch):
    work, _ = runs
    monkeypatch.syspath_prepend(str(work))
    assert cli.main(["bench", "tinynet_cli:make_with_inputs", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "2x3x8x8" in out and "latency" in out
    assert cli.main(["prune", "tinynet_cli:make", "--repeats", "0"]) == 1
    assert "needs example inputs (--input-shape" in capsys.readouterr().err


def test_demo_runs_the_main_job(runs):
    work, out = _ok(runs, "demo")
    for needle in ("Dependency groups", "gp.prune", "parameters", "MACs", "latency", "gp.verify",
                   "identical"):
        assert needle in out
    assert (work / "demo_out" / "mlp_slim.gp").exists()
    assert (work / "demo_out" / "mlp_report" / "report.json").exists()


def test_bad_input_subprocess_one_line(runs):
    _, results = runs
    got_rc, out, err = results["bad_model"]
    assert got_rc == 1
    needle = "unknown MODEL 'nosuchmodel'"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("graphprune: error:") and needle in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, rc, needle", [
    (["prune", "mlp", "--method", "nosuch"], 1, "unknown method 'nosuch'"),
    (["prune", "mlp", "--input-shape", "2,x"], 1, "--input-shape '2,x'"),
    (["prune", "mlp", "--input-shape", "2,3,32,32"], 1, "example inputs"),
    (["prune", "mlp", "--kwargs", "[1]"], 1, "--kwargs must be a JSON object"),
    (["prune", "mlp", "-O", "oops"], 1, "name=value"),
    (["prune", "nosuchpkg_xyz:make", "--input-shape", "1,2"], 1, "cannot import module 'nosuchpkg_xyz'"),
    (["prune", "os:getcwd", "--input-shape", "1,2"], 1, "must return an nn.Module"),
    (["prune", "timm:"], 1, "names no model"),
    (["prune", "hf:"], 1, "names no model"),
    (["prune", "mlp", "--ignore", "nosuchlayer"], 1, "ignore names 'nosuchlayer'"),
    (["prune", "mlp", "--checkpoint", "missing_weights.pt"], 1, "checkpoint 'missing_weights.pt': no such file"),
    (["prune", "mlp", "--round-to", "0"], 2, "--round-to: must be at least 1"),
    (["prune", "mlp", "--steps", "0"], 2, "--steps: must be at least 1"),
    (["prune", "mlp", "--min-keep", "0"], 2, "neither a channel count"),
    (["prune", "mlp", "--min-keep", "1.5"], 2, "neither a channel count"),
    (["prune", "mlp", "--max-ratio", "1.5"], 2, "--max-ratio: must be in (0, 1]"),
    (["prune", "mlp", "--ratios", "fc1"], 2, "is not LAYER=RATIO"),
    (["prune", "mlp", "--scope", "galactic"], 2, "invalid choice"),
    (["inspect", "mlp", "--factor", "nosuch"], 2, "invalid choice"),
    (["prune", "nosuchdir/models.py:make"], 1, "no such file"),
    (["inspect", "mlp", "--trust", "__main__"], 1, "trust names modules"),
    (["inspect", "missing_file.gp"], 1, "no such file"),
    (["prune", "mlp", "--ratio", "abc"], 2, "--ratio"),
    (["prune", "mlp", "--ratio", "1.5"], 2, "must be in [0, 1)"),
    (["prune", "mlp", "--macs", "0.5", "--params", "0.5"], 2, "not allowed with"),
    (["frobnicate"], 2, "invalid choice"),
    (["demo", "--model", "nosuch"], 2, "invalid choice"),
])
def test_bad_input_in_process(argv, rc, needle, capsys):
    assert cli.main(argv) == rc
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("graphprune: error:") and needle in lines[0], lines[0]


def test_target_flags_pass_through_or_fail_clearly(capsys):
    rc = cli.main(["prune", "mlp", "--macs", "0.5", "--repeats", "0"])
    err = capsys.readouterr().err
    assert rc == 0, err


def test_loaded_file_can_be_pruned_again(tmp_path, capsys):
    first, second = tmp_path / "a.gp", tmp_path / "b.gp"
    assert cli.main(["prune", "mlp", "--ratio", "0.5", "--out", str(first), "--repeats", "0"]) == 0
    assert cli.main(["prune", str(first), "--ratio", "0.5", "--out", str(second), "--repeats", "0"]) == 0
    capsys.readouterr()
    _, x = gp.zoo.create("mlp")
    assert gp.count(gp.load(second), x).params < gp.count(gp.load(first), x).params
    assert len(gp.load(second).meta["graphprune"]["plans"]) == 2


def test_saved_files_call_only_trusted_factories(runs, tmp_path, capsys, monkeypatch):
    work, _ = runs
    monkeypatch.syspath_prepend(str(work))
    tiny = str(work / "tiny.gp")
    assert cli.main(["inspect", tiny]) == 1
    err = capsys.readouterr().err
    assert "not trusted" in err and "--trust tinynet_cli" in err
    assert cli.main(["inspect", tiny, "--trust", "tinynet_cli"]) == 0
    assert "tiny.gp (file)" in capsys.readouterr().out
    again = tmp_path / "again.gp"
    assert cli.main(["prune", tiny, "--trust", "other", "--trust", "tinynet_cli", "--ratio", "0.3",
                     "--out", str(again), "--repeats", "0"]) == 0
    capsys.readouterr()
    assert len(gp.load(again, trust=["tinynet_cli"]).meta["graphprune"]["plans"]) == 2


def test_file_path_factory_and_cwd_import_spec(tmp_path, capsys, monkeypatch):
    models = tmp_path / "pkgdir" / "gp_cli_pathmodels.py"
    models.parent.mkdir()
    models.write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "gp_cli_pathmodels", raising=False)
    assert cli.main(["bench", "pkgdir/gp_cli_pathmodels.py:make_with_inputs", "--repeats", "1"]) == 0
    assert "2x3x8x8" in capsys.readouterr().out
    # a factory loaded from a path cannot be found by name in another process: save says so
    assert cli.main(["prune", "pkgdir/gp_cli_pathmodels.py:make_with_inputs", "--repeats", "0",
                     "--out", "x.gp"]) == 1
    assert "cannot be imported by name" in capsys.readouterr().err
    assert not (tmp_path / "x.gp").exists()
    monkeypatch.delitem(sys.modules, "gp_cli_pathmodels")
    (tmp_path / "gp_cli_cwdmodels.py").write_text(TINY)  # the current directory is importable
    monkeypatch.delitem(sys.modules, "gp_cli_cwdmodels", raising=False)
    try:
        assert cli.main(["prune", "gp_cli_cwdmodels:make_with_inputs", "--repeats", "0", "--out", "y.gp"]) == 0
        assert gp.load("y.gp", trust=["gp_cli_cwdmodels"]).c1.out_channels == 4
    finally:
        sys.modules.pop("gp_cli_cwdmodels", None)
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))


def test_parse_shape():
    assert cli.parse_shape("1,3,32,32") == ((1, 3, 32, 32), torch.float32)
    assert cli.parse_shape("4, 16:int64") == ((4, 16), torch.int64)


def test_report_without_matplotlib(tmp_path, monkeypatch):
    from graphprune import report as rp

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    model, x = gp.zoo.create("mlp")
    result = gp.prune(model, x, ratio=0.5)
    rep = rp.build_report(model="mlp", dg=result.graph, plan=result.plan, before=result.before,
                          after=result.after, method="magnitude", settings={"ratio": 0.5},
                          widths_before=rp.layer_widths(model), widths_after=rp.layer_widths(result.model))
    written = rp.write_report(rep, tmp_path)
    assert sorted(p.name for p in written) == ["report.json", "report.md"]
    assert rep["layers"][0] == {"layer": "fc1", "before": 128, "after": 64}
    assert "| fc1 | 128 | 64 |" in (tmp_path / "report.md").read_text()


def test_data_driven_method_with_data_file(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "data.pt"
    torch.save({"inputs": torch.randn(24, 64, generator=gen), "targets": torch.randint(0, 10, (24,), generator=gen)},
               data)
    assert cli.main(["prune", "mlp", "--method", "taylor", "--data", str(data), "--batch-size", "8",
                     "--ratio", "0.5", "--repeats", "0"]) == 0
    assert "method taylor" in capsys.readouterr().out
    assert cli.main(["prune", "mlp", "--method", "taylor", "--repeats", "0"]) == 1
    assert "--data FILE" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(2)}, bad)
    assert cli.main(["prune", "mlp", "--method", "taylor", "--data", str(bad), "--repeats", "0"]) == 1
    assert "must hold" in capsys.readouterr().err


def test_demo_says_why_there_is_no_widths_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main(["demo", "--model", "mlp", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(no widths.png: matplotlib is not installed; pip install 'graphprune[plot]'" in out
    assert (tmp_path / "mlp_report" / "groups.html").exists()


def test_demo_draws_widths_png_in_the_dev_install(runs):
    work, _ = _ok(runs, "demo")
    assert (work / "demo_out" / "mlp_report" / "widths.png").exists(), "make demo installs matplotlib (dev extra)"
