"""The documentation: the mkdocs site builds in strict mode, and the README stays short with working links.

The strict build is what catches a broken link, a missing anchor, a page left out of the nav or an
API reference to a name that does not exist (``mkdocs.yml`` turns each into a warning, and
``strict: true`` turns warnings into a failed build). The README and the changelog are read on
GitHub, outside the site, so their relative links are checked here directly, anchors included
(GitHub's heading slugs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300  # issue 19: "at most about 300 lines"; the rest lives in docs/
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2, not a warning of ours
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=config.parent, env=env, capture_output=True, text=True,
                          timeout=240)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        slug = github_slug(heading)
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(markdown: str, base: Path) -> list[str]:
    """Relative links in ``markdown`` (a file in folder ``base``) whose file or heading does not exist."""
    text = INLINE_CODE.sub("", FENCE.sub("", markdown))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve() if path else None
        if file is not None and not file.exists():
            broken.append(target)
        elif anchor and (file is None or file.suffix == ".md"):
            heads = anchors(file.read_text() if file else markdown)
            if anchor not in heads:
                broken.append(target)
    return broken


def test_site_builds_in_strict_mode(tmp_path):
    for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(name, reason="the docs toolchain is the `docs` extra: pip install -e '.[docs]'")
    proc = _mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    pages = {p.parent.name for p in (tmp_path / "site").glob("*/index.html")}
    assert {"optimizers", "training", "offload", "scale-out", "allocators", "test-time-compute", "zeroth-order",
            "kernels", "reliability", "api"} <= pages
    # mkdocstrings rendered the API reference (a failed lookup fails the strict build; this checks it ran)
    assert 'id="scrimp.optim.GaLoreAdamW"' in (tmp_path / "site" / "api" / "index.html").read_text()


def test_the_strict_settings_fail_a_broken_link_and_a_missing_anchor(tmp_path):
    # The repository's own validation settings, on one page with a broken link and a broken anchor.
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("material")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[gone](missing.md) and [nowhere](#no-such-heading)\n")
    config.update(docs_dir="docs", nav=[{"Home": "index.md"}], plugins=["search"])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    proc = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    # Both are warnings (mkdocs' default for anchors is INFO, which strict mode lets through).
    assert any("'missing.md'" in line for line in warnings), proc.stderr
    assert any("'#no-such-heading'" in line for line in warnings), proc.stderr


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md"])
def test_every_relative_link_points_to_an_existing_file_and_heading(name):
    path = REPO / name
    assert broken_links(path.read_text(), path.parent) == []


def test_the_link_check_finds_broken_files_and_anchors(tmp_path):
    (tmp_path / "page.md").write_text("# Page\n\n## A section (`code`)\n")
    text = ("# Top\n[ok](page.md) [ok](page.md#a-section-code) [ok](#top) [web](https://example.org/x.md)\n"
            "[bad](nope.md) [bad](page.md#nope) [bad](#nowhere) ![bad](img/none.png)\n"
            "```\n[inside a code block](ignored.md)\n```\n")
    assert broken_links(text, tmp_path) == ["nope.md", "page.md#nope", "#nowhere", "img/none.png"]
