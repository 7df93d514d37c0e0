"""The README is a front page and docs/ the manual: every link resolves, every flag of every
command is documented on its page, and what the docs quote a command printing, it prints."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastnst.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
# Where each command's flags are documented.
COMMAND_PAGES = {"stylize": "usage.md", "batch": "usage.md", "plan": "usage.md", "bench": "usage.md",
                 "info": "usage.md", "video": "video.md"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the manual is docs/"
    text = "\n".join(lines)
    assert "pip install -e \".[test]\" && pytest" in text  # the test command CI runs
    assert "--index-url https://download.pytorch.org/whl/cpu" in text  # the CPU-only install


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: command for name, command in sub.choices.items() if name in COMMAND_PAGES}


def _flags(command: argparse.ArgumentParser) -> set[str]:
    return {option for action in command._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def _documented(flag: str, page: str) -> bool:
    return re.search(re.escape(flag) + r"(?![\w-])", page) is not None


@pytest.mark.parametrize("command", sorted(COMMAND_PAGES))
def test_every_flag_of_every_command_is_in_the_manual(command):
    """A command's own flags on its page; the stylize options it shares, on usage.md's stylize table."""
    commands = _commands()
    page = (ROOT / "docs" / COMMAND_PAGES[command]).read_text()
    usage = (ROOT / "docs" / "usage.md").read_text()
    shared = _flags(commands["stylize"])
    missing = sorted(flag for flag in _flags(commands[command])
                     if not _documented(flag, page) and not (flag in shared and _documented(flag, usage)))
    assert not missing, f"fastnst {command}: {missing} not in docs/{COMMAND_PAGES[command]}"


def test_the_planner_line_the_docs_quote_is_what_it_prints():
    page = (ROOT / "docs" / "large-images.md").read_text()
    quoted = re.search(r"```text\n(L-BFGS state[^\n]*)\n```", page).group(1)
    done = subprocess.run([sys.executable, "-m", "fastnst", "plan", "--size", "8000", "--weights", "random",
                           "--device", "cpu"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert quoted in done.stdout.splitlines(), done.stdout


def test_there_is_a_license_and_it_is_the_one_pyproject_names():
    license_text = (ROOT / "LICENSE").read_text()
    declared = re.search(r'(?m)^license = \{ text = "([^"]+)" \}', (ROOT / "pyproject.toml").read_text())
    assert declared and declared.group(1) == "MIT" and license_text.startswith("MIT License")
