"""The documentation site builds strictly, offline, and documents every command; the README's links and commands hold.

The site is built once per session (``mkdocs build --strict`` into a temporary folder, as CI runs it in the default
suite); the command-line reference inside it is generated from the parsers by ``docs/hooks/cli_reference.py``.
"""

import argparse
import html
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TOOLS_PROG = "python -m birder.tools"
BUILD_TIMEOUT_S = 300


def _console_scripts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]["scripts"]


def _script_parser(name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(_console_scripts()[name].split(":")[0])
    return module.build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {
        name: sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for (name, sub) in action.choices.items()
    }


def _tools_parsers() -> dict[str, argparse.ArgumentParser]:
    from birder.tools.cli import build_parser

    return _subparsers(build_parser())


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """A parser and its subcommands' parsers, recursively."""
    found = [parser]
    for sub in _subparsers(parser).values():
        found += _all_parsers(sub)
    return found


def _page_html(site: Path, src: str) -> str:
    """The built HTML of a docs-relative Markdown path (directory URLs: ``x.md`` is ``x/index.html``)."""
    stem = src.removesuffix(".md")
    built = site / (stem.removesuffix("index") if stem.split("/")[-1] == "index" else f"{stem}/") / "index.html"
    assert built.is_file(), f"{src} was not built into {built}"
    return built.read_text()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # python -m mkdocs puts the working directory (the checkout) first on sys.path, as the hook does itself
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return site_dir


def test_strict_build_has_every_page_of_docs(site: Path) -> None:
    # --strict with validation.omitted_files: a page left out of the nav fails the build; here each one was built
    pages = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.glob("*.md"))
    assert "index.md" in pages and "compatibility.md" in pages
    for page in pages:
        assert "<h1" in _page_html(site, page), page


def _documented_options(page: str) -> set[str]:
    """Option strings written as ``<code>--opt ...</code>`` on a reference page."""
    return {match.split(" ")[0] for match in re.findall(r"<code>(-[^<]*)</code>", html.unescape(page))}


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_every_console_script_has_a_reference_page_with_each_option(site: Path, script: str) -> None:
    page = _page_html(site, f"reference/{script}.md")
    documented = _documented_options(page)
    for parser in _all_parsers(_script_parser(script)):
        assert html.escape(parser.prog) in page, f"{script}: no section for {parser.prog}"
        for action in parser._actions:
            for option in action.option_strings:
                assert option in documented, f"{script}: {parser.prog} {option} is not on its reference page"


@pytest.mark.parametrize("command", sorted(_tools_parsers()))
def test_every_tools_command_has_a_reference_page_with_each_option(site: Path, command: str) -> None:
    page = _page_html(site, f"reference/tools-{command}.md")
    assert f"{TOOLS_PROG} {command}" in page
    documented = _documented_options(page)
    for action in _tools_parsers()[command]._actions:
        for option in action.option_strings:
            assert option in documented, f"{TOOLS_PROG} {command} {option} is not on its reference page"


def test_reference_index_links_every_command(site: Path) -> None:
    index = _page_html(site, "reference/index.md")
    for script in _console_scripts():
        assert f'href="{script}/"' in index, script
    for command in _tools_parsers():
        assert f'href="tools-{command}/"' in index, command


def _load_hook() -> types.ModuleType:
    name = "docs_hooks_cli_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DOCS / "hooks" / "cli_reference.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_reference_renders_groups_defaults_choices_and_subcommands() -> None:
    # A parser made here: what it says must reach the page, Markdown specials shown as written
    parser = argparse.ArgumentParser(prog="demo", description="Sort ``photos`` into <class>/ folders.")
    group = parser.add_argument_group("execution", "how it runs")
    group.add_argument("-b", "--batch-size", type=int, default=32, metavar="N", help="photos per batch")
    group.add_argument("--mode", choices=["fast", "exact"], default="exact", metavar="M", help="%(default)s is safe")
    group.add_argument("--secret", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    show = commands.add_parser("show", help="show one")
    show.add_argument("inputs", nargs="+", metavar="PHOTO", help="files_or folders *here*")
    show.add_argument("--top-k", type=int, default=5)

    page = "\n".join(_load_hook().render_parser(parser, 1))
    assert page.startswith("Sort `photos` into &lt;class&gt;/ folders.\n\n```text\nusage: demo [-h] [-b N] [--mode M]")
    assert "## execution\n\nhow it runs\n\n- **`-b N`, `--batch-size N`**: photos per batch (default: `32`)" in page
    assert "- **`--mode M`**: exact is safe (one of `fast`, `exact`)" in page
    assert "--secret" not in page
    assert "## `demo show`\n\nshow one\n\n```text\nusage: demo show [-h] [--top-k TOP_K] PHOTO [PHOTO ...]" in page
    assert "### positional arguments\n\n- **`PHOTO [PHOTO ...]`**: files\\_or folders \\*here\\*" in page
    assert "- **`--top-k TOP_K`** (default: `5`)" in page


def _readme_links() -> list[str]:
    return re.findall(r"\]\((docs/[^)\s]+)\)", README.read_text())


def test_readme_links_into_docs_resolve(site: Path) -> None:
    links = _readme_links()
    assert len(links) >= 10  # the front page points into the docs for each job and in its "Read on" table
    for link in links:
        (path, _, anchor) = link.partition("#")
        source = ROOT / path
        assert source.is_file(), f"README links to {link}, which does not exist"
        built = _page_html(site, source.relative_to(DOCS).as_posix())
        if anchor:
            assert f'id="{anchor}"' in built, f"README links to {link}: no such heading on the page"


def _readme_block(heading: str) -> str:
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    following = re.search(r"\n## ", text[start + 1 :])
    return text[start : start + 1 + following.start()] if following else text[start:]


def test_readme_quick_start_is_the_two_commands_ci_runs() -> None:
    # .ci/run runs the README's Quick start verbatim: the two commands stay, one code block each
    quick_start = _readme_block("## Quick start")
    blocks = re.findall(r"```bash\n(.*?)\n```", quick_start, re.DOTALL)
    assert blocks == ['pip install -e ".[test]"', "python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert '\npip install -e ".[test]"\n' in ci and "\npython -m pytest\n" in ci


def _readme_commands() -> list[list[str]]:
    """Every birder command line of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and (words[0].startswith("birder-") or line.startswith(TOOLS_PROG)):
                commands.append(words)
    return commands


def test_readme_commands_parse_with_their_parsers() -> None:
    # The front page's commands are real: each is accepted by the parser of the command it calls
    commands = _readme_commands()
    assert {words[0] for words in commands} >= {"birder-predict", "birder-train"}
    for words in commands:
        if words[0].startswith("birder-"):
            (parser, argv) = (_script_parser(words[0]), words[1:])
        else:
            (parser, argv) = (_tools_parsers()[words[3]], words[4:])
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README command does not parse ({exc}): {shlex.join(words)}")


def test_site_fetches_nothing() -> None:
    # Offline builds and pages: only MkDocs' own search plugin, and no web fonts from Material
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["plugins"] == ["search"]
    assert config["theme"]["name"] == "material" and config["theme"]["font"] is False
    assert config["hooks"] == ["docs/hooks/cli_reference.py"]


def test_hook_is_ruff_clean() -> None:
    # The hook is Python outside the packages tests/test_lint.py checks; it keeps the same rules
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "docs/hooks"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
