"""The README, docs and committed benchmark reports refer only to files that are in the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("benchmarks/**/*.md"),
               *ROOT.glob("comfyui/**/*.md")])
FILE_TOKEN = re.compile(r"^[\w./-]+\.(md|py|png|sh|json|npz|txt|toml|cfg)$")
OUTSIDE = re.compile(r"\b(EPD|BASELINES|ECOSYSTEM)\.md\b|shared/spec|\.\./shared")
# files of a diffusers folder the docs describe, not files of this repository
HOST_FILES = {"model_index.json", "scheduler_config.json", "config.json"}
REPO_NAMES = {p.name for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts}


def references(text: str):
    """(target, kind) for markdown links and inline-code file names, outside fenced code blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if not re.match(r"^(https?:|mailto:|#)", target):
            yield target.split("#")[0], "link"
    for span in re.findall(r"`([^`\n]+)`", prose):
        if FILE_TOKEN.match(span) and not span.startswith("-"):
            yield span, "code"


def exists(doc: Path, target: str, kind: str) -> bool:
    if (doc.parent / target).exists() or target in HOST_FILES:
        return True
    if kind == "code" and any((base / target).exists() for base in (ROOT, ROOT / "src" / "epd_solver")):
        return True  # a path from the repository root or the package (docs/DESIGN.md names modules so)
    # a bare file name in inline code names a file somewhere in the repository (e.g. a results table)
    return kind == "code" and "/" not in target and target in REPO_NAMES


def test_the_documents_are_found():
    assert ROOT / "README.md" in DOCS and len(DOCS) >= 5


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_referenced_file_exists(doc):
    text = doc.read_text(encoding="utf-8")
    missing = sorted({t for t, kind in references(text) if not exists(doc, t, kind)})
    assert not missing, f"{doc.relative_to(ROOT)} refers to files not in the repository: {missing}"
    outside = sorted(set(m.group(0) for m in OUTSIDE.finditer(text)))
    assert not outside, f"{doc.relative_to(ROOT)} cites files outside the repository: {outside}"


def test_the_checker_flags_a_missing_file(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see [there](nowhere/at-all.md) and `missing-table.md`, ```\n`code.md`\n```")
    found = list(references(doc.read_text()))
    assert ("nowhere/at-all.md", "link") in found and ("missing-table.md", "code") in found
    assert ("code.md", "code") not in found
    assert not exists(doc, "nowhere/at-all.md", "link") and not exists(doc, "missing-table.md", "code")
