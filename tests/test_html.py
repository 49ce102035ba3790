"""The HTML groups view in a real browser: headless Chromium loads the file, runs its script,
and the test reads back what it rendered (``--dump-dom``) and takes a screenshot.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it). Without it these tests
fail with a message saying so: the view's script is only tested here.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import graphprune as gp
from graphprune import cli

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--virtual-time-budget=5000"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("the HTML view is tested in headless Chromium, which is not installed: "
                "apt-get install -y chromium (.ci/run installs it before make test)")


def _browse(page: Path, fragment: str, work: Path, *extra: str) -> str:
    url = page.resolve().as_uri() + fragment
    cmd = [_chromium(), *FLAGS, f"--user-data-dir={work / 'profile'}", *extra, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Elements(HTMLParser):
    """Every start tag with its attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def _dom(text: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Elements()
    parser.feed(text)
    return parser.tags


def _classes(attrs: dict[str, str]) -> set[str]:
    return set(attrs.get("class", "").split())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``graphprune prune mini_resnet50 --report DIR``: the page a user opens."""
    work = tmp_path_factory.mktemp("html")
    assert cli.main(["prune", "mini_resnet50", "--ratio", "0.5", "--repeats", "0", "--no-plot",
                     "--report", str(work / "rep")]) == 0
    model, x = gp.zoo.create("mini_resnet50")
    dg = gp.prune(model, x, ratio=0.5).graph
    return work, work / "rep" / "groups.html", dg


def test_selecting_a_group_highlights_its_layers(report):
    work, page, dg = report
    lg = dg.layer_graph()
    gid = max(range(len(dg.groups)), key=lambda g: len(lg.group_layers(g)[0]))  # the most shared group
    producers, consumers = lg.group_layers(gid)
    assert len(producers) > 2
    tags = _dom(_browse(page, f"#group={gid}", work, "--dump-dom"))
    body = next(a for t, a in tags if t == "body")
    assert body["data-ready"] == "1", "the page's script did not run"
    assert body["data-selected"] == str(gid) and body["data-highlighted"] == str(len(producers) + len(consumers))
    groups = [a for t, a in tags if t == "li" and "group" in _classes(a)]
    assert len(groups) == len(dg.groups)
    assert [a["data-group"] for a in groups if "selected" in _classes(a)] == [str(gid)]
    nodes = [a for t, a in tags if t == "g" and "node" in _classes(a)]
    assert len(nodes) == len(lg.layers)
    assert sorted(a["data-name"] for a in nodes if "sel-out" in _classes(a)) == sorted(producers)
    assert sorted(a["data-name"] for a in nodes if "sel-in" in _classes(a)) == sorted(consumers)
    svg = next(a for t, a in tags if t == "svg")
    assert "dimmed" in _classes(svg)  # the rest fades


def test_no_selection_without_fragment_and_unknown_group(report):
    work, page, dg = report
    for fragment in ("", f"#group={len(dg.groups) + 5}"):
        tags = _dom(_browse(page, fragment, work, "--dump-dom"))
        body = next(a for t, a in tags if t == "body")
        assert body["data-ready"] == "1" and body["data-selected"] == ""
        assert not [a for t, a in tags if "sel-out" in _classes(a) or "selected" in _classes(a)]


def test_screenshot(report, tmp_path):
    work, page, dg = report
    shot = tmp_path / "groups.png"
    _browse(page, "#group=3", work, f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1400, 1000)
    assert len(data) > 20_000  # a drawn page, not a blank one
    print(f"screenshot of the HTML view: {shot}")


def test_inspect_html_is_self_contained(report, capsys):
    work, _, _ = report
    page = work / "inspect.html"
    assert cli.main(["inspect", "mini_inception", "--html", str(page)]) == 0
    capsys.readouterr()
    text = page.read_text()
    assert not re.search(r"<link|src=|@import", text)
    tags = _dom(_browse(page, "#group=1", work, "--dump-dom"))
    body = next(a for t, a in tags if t == "body")
    assert body["data-selected"] == "1" and int(body["data-highlighted"]) >= 2
