"""MkDocs hook: the command-line reference, generated from the commands' own argparse parsers at every build.

Every console script of ``pyproject.toml`` ([project.scripts]) gets a page, rendered from the ``build_parser()`` of
its entry point's module, and so does every subcommand of ``python -m birder.tools``. Nothing is written by hand,
so the reference cannot drift from ``--help``. The pages are added in memory (``reference/*.md``); the nav entry
``reference/index.md`` in mkdocs.yml becomes a section holding them.

Rendering reads argparse's action list (``parser._actions``, ``_action_groups``, and the help formatter's helpers
for metavars and ``%(default)s``): argparse has no public interface for this, and these names have been stable for
more than a decade (sphinx-argparse and similar tools read them too).
"""

from __future__ import annotations

import argparse
import html
import importlib
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = "reference"
REFERENCE_INDEX = f"{REFERENCE_DIR}/index.md"
TOOLS_MODULE = "birder.tools.cli"
TOOLS_PROG = "python -m birder.tools"
# Usage lines are wrapped at this width whatever the terminal that runs the build, so the pages do not change
USAGE_WIDTH = 100
_RST_LITERAL = re.compile(r"``(.+?)``")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]{}#|!])")


@dataclass(frozen=True)
class CommandPage:
    """One generated page: the command as typed, the page's path in the site, and the parser it documents."""

    command: str
    src_uri: str
    parser: argparse.ArgumentParser
    kind: str  # "script" (a console script) or "tool" (a python -m birder.tools subcommand)
    summary: str | None = None  # a subcommand's one-line help, shown when it has no description

    @property
    def title(self) -> str:
        """The name in the nav and the index: the script, or the tool's subcommand alone."""
        return self.command.removeprefix(f"{TOOLS_PROG} ")


def console_scripts(pyproject: Path = REPO_ROOT / "pyproject.toml") -> dict[str, str]:
    """``{script name: "module:function"}`` as pyproject.toml declares them."""
    with pyproject.open("rb") as handle:
        return dict(tomllib.load(handle)["project"]["scripts"])


def script_parser(target: str) -> argparse.ArgumentParser:
    """The parser of a console script's entry point ``module:function``: its module's ``build_parser()``."""
    module_name = target.split(":", 1)[0]
    module = importlib.import_module(module_name)
    build_parser = getattr(module, "build_parser", None)
    if build_parser is None:
        raise PluginError(f"{module_name} has no build_parser(): the command-line reference cannot document it")
    return build_parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name (empty when it has none)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def command_pages() -> list[CommandPage]:
    """Every page of the reference, console scripts first (in pyproject order), then the birder.tools commands."""
    pages = [
        CommandPage(name, f"{REFERENCE_DIR}/{name}.md", script_parser(target), "script")
        for (name, target) in console_scripts().items()
    ]
    tools_parser = importlib.import_module(TOOLS_MODULE).build_parser()
    summaries = {choice.dest: choice.help for choice in _choice_actions(tools_parser)}
    pages += [
        CommandPage(f"{TOOLS_PROG} {name}", f"{REFERENCE_DIR}/tools-{name}.md", parser, "tool", summaries.get(name))
        for (name, parser) in subcommands(tools_parser).items()
    ]
    return pages


def markdown_text(text: str) -> str:
    """Plain help text as Markdown: ``literal`` spans become code, everything else is shown as written."""
    parts = _RST_LITERAL.split(text)
    # split() alternates outside / inside the ``...`` pairs
    return "".join(
        f"`{part}`" if inside else _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(part, quote=False))
        for (inside, part) in ((index % 2 == 1, part) for (index, part) in enumerate(parts))
    )


def paragraphs(text: str | None) -> list[str]:
    """A description or epilog as argparse prints it (runs of whitespace joined), one entry per paragraph."""
    if not text:
        return []
    blocks = re.split(r"\n\s*\n", text.strip())
    return [markdown_text(" ".join(block.split())) for block in blocks if block.strip()]


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)


def usage(parser: argparse.ArgumentParser) -> str:
    formatter = _formatter(parser)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def invocations(parser: argparse.ArgumentParser, action: argparse.Action) -> list[str]:
    """How an argument is written: ``["-b N", "--batch-size N"]``, or the metavar of a positional."""
    formatter = _formatter(parser)
    if not action.option_strings:
        return [formatter._format_args(action, formatter._get_default_metavar_for_positional(action))]
    if action.nargs == 0:
        return list(action.option_strings)
    value = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
    return [f"{option} {value}" for option in action.option_strings]


def option_facts(action: argparse.Action) -> list[str]:
    """What the help line may not say: required, the choices, the default (unless its help names it)."""
    facts = []
    if action.required and action.option_strings:
        facts.append("required")
    # A metavar hides the choices from the usage line: say them here
    if action.choices is not None and action.metavar is not None and not isinstance(action, argparse._SubParsersAction):
        facts.append("one of " + ", ".join(f"`{choice}`" for choice in action.choices))
    default = action.default
    shows_default = (
        action.nargs != 0
        and default is not None
        and default is not argparse.SUPPRESS
        and "default" not in (action.help or "").lower()
    )
    if shows_default:
        facts.append(f"default: `{default}`")
    return facts


def render_action(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = _formatter(parser)
    help_text = formatter._expand_help(action) if action.help else ""
    written = ", ".join(f"`{form}`" for form in invocations(parser, action))
    facts = option_facts(action)
    line = f"- **{written}**"
    if help_text:
        # A help text that is only "(default: 32)" reads as a remark on the option, not as its description
        separator = " " if help_text.startswith("(") else ": "
        line += separator + markdown_text(" ".join(help_text.split()))
    if facts:
        line += f" ({'; '.join(facts)})"
    if isinstance(action, argparse._SubParsersAction):
        line += ": " + ", ".join(f"`{name}`" for name in action.choices)
    return line


def render_parser(parser: argparse.ArgumentParser, level: int, summary: str | None = None) -> list[str]:
    """The Markdown of one parser: description, usage, its argument groups, then each subcommand one level down."""
    lines: list[str] = []
    described = paragraphs(parser.description) or paragraphs(summary)
    for paragraph in described:
        lines += [paragraph, ""]
    lines += ["```text", usage(parser), "```", ""]
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if action.help is not argparse.SUPPRESS]
        if not actions:
            continue
        lines += [f"{'#' * (level + 1)} {markdown_text(group.title or 'arguments')}", ""]
        for paragraph in paragraphs(group.description):
            lines += [paragraph, ""]
        lines += [render_action(parser, action) for action in actions]
        lines.append("")
    for paragraph in paragraphs(parser.epilog):
        lines += [paragraph, ""]
    summaries = {choice.dest: choice.help for choice in _choice_actions(parser)}
    for name, sub in subcommands(parser).items():
        lines += [f"{'#' * (level + 1)} `{sub.prog}`", ""]
        lines += render_parser(sub, level + 1, summaries.get(name))
    return lines


def _choice_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The pseudo-actions argparse keeps for the subcommands' one-line help."""
    return [
        choice
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
    ]


def command_page(page: CommandPage) -> str:
    header = [
        f"# `{page.command}`",
        "",
        "<!-- Generated at build time from the parser by docs/hooks/cli_reference.py: edit the parser, not this. -->",
        "",
    ]
    return "\n".join(header + render_parser(page.parser, 1, page.summary)).rstrip() + "\n"


def first_sentence(page: CommandPage) -> str:
    text = " ".join((page.parser.description or page.summary or "").split())
    return markdown_text(text.split(". ")[0].rstrip("."))


def index_page(pages: list[CommandPage]) -> str:
    lines = [
        "# Command-line reference",
        "",
        "Generated at build time from each command's own argparse parser (`docs/hooks/cli_reference.py`), so it",
        "says what `--help` says.",
        "",
        "## Console scripts",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for page in pages:
        if page.kind == "script":
            lines.append(f"| [`{page.command}`]({Path(page.src_uri).name}) | {first_sentence(page)} |")
    lines += ["", f"## `{TOOLS_PROG}`", "", "| command | what it does |", "|---|---|"]
    for page in pages:
        if page.kind == "tool":
            lines.append(f"| [`{page.title}`]({Path(page.src_uri).name}) | {first_sentence(page)} |")
    return "\n".join(lines) + "\n"


# The hook's state between on_config and on_files of one build
_pages: list[CommandPage] = []


def _expand_reference_nav(nav: list[Any], pages: list[CommandPage]) -> bool:
    """Put the generated pages after ``reference/index.md`` in the nav list that holds it (searched depth first)."""
    for position, item in enumerate(nav):
        if item == REFERENCE_INDEX or (isinstance(item, dict) and REFERENCE_INDEX in item.values()):
            scripts = [{page.title: page.src_uri} for page in pages if page.kind == "script"]
            tools = [{page.title: page.src_uri} for page in pages if page.kind == "tool"]
            nav[position + 1 : position + 1] = [*scripts, {TOOLS_PROG: tools}]
            return True
        children = next(iter(item.values())) if isinstance(item, dict) and len(item) == 1 else None
        if isinstance(children, list) and _expand_reference_nav(children, pages):
            return True
    return False


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    # The checkout being documented comes first, whatever birder an environment has installed
    if str(REPO_ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(REPO_ROOT))
    _pages[:] = command_pages()
    if config.nav is None or not _expand_reference_nav(config.nav, _pages):
        raise PluginError(f"mkdocs.yml: the nav needs an entry for {REFERENCE_INDEX} (the command-line reference)")
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, REFERENCE_INDEX, content=index_page(_pages)))
    for page in _pages:
        files.append(File.generated(config, page.src_uri, content=command_page(page)))
    return files
