"""The docs stay true: links, commands, the generated config reference, moved tool paths.

- Every relative link in README.md and docs/**/*.md resolves to a file, and every `#anchor`
  to a heading of the target page (GitHub's slug rules).
- Every `megarlhf <command>` in a code block is a real subcommand whose `--help` runs, and
  every `python tools/...py` / `python examples/...py` (also under torchrun) is a script
  whose `--help` runs: each distinct one once, all scripts in one subprocess.
- docs/config.md is what `python -m megarlhf.config.docs` writes from the docstrings.
- The benchmark scripts' old paths in tools/ still run their new ones in tools/bench/.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MEGARLHF = re.compile(r"(?:^|[\s;|&(])(?:-m\s+)?megarlhf((?:\s+-[-\w]+)*)\s+([a-z][\w-]*)")
SCRIPT = re.compile(r"(?:^|\s)(?:\S*python\S*|torchrun(?:\s+-[-\w]+(?:[ =][\w.:-]+)?)*)\s+((?:tools|examples)/[\w./-]+\.py)\b")


def doc_files(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")  # code blocks whose lines are commands


def split_markdown(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, lines of shell code blocks) of a Markdown page (```text, ```python,
    ```yaml blocks are neither)."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fence = line.strip()[3:].strip() if fence is None else None
            continue
        if fence is None:
            prose.append(line)
        elif fence in SHELL_BLOCKS:
            code.append(line)
    return prose, code


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation removed
    (letters, digits, '-', '_' and spaces kept), spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = text.replace("`", "").replace("*", "").strip().lower()
    kept = "".join(ch for ch in text if ch in "-_ " or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_markdown(page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def check_links(pages: list[Path]) -> list[str]:
    """'page: link: what is wrong' for every relative link that does not resolve."""
    problems = []
    for page in pages:
        prose, _ = split_markdown(page.read_text())
        text = re.sub(r"`[^`\n]*`", "", "\n".join(prose))  # links inside code spans are not links
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                problems.append(f"{page}: {target}: no such file {dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page}: {target}: no heading '#{anchor}' in {dest.name}")
    return problems


def commands(pages: list[Path]) -> tuple[dict[str, str], dict[str, str]]:
    """({subcommand: first page naming it}, {script path: first page naming it}) from shell
    code blocks and from inline code spans that start with a command."""
    subcommands, scripts = {}, {}
    for page in pages:
        prose, code = split_markdown(page.read_text())
        spans = re.findall(r"`([^`\n]+)`", "\n".join(prose))
        code = code + [span for span in spans if re.match(r"(\S*python\S*|torchrun|megarlhf)\s", span)]
        for line in code:
            line = re.sub(r"(^|\s)#.*", "", line)  # shell comments name no commands
            for _, name in MEGARLHF.findall(line):
                subcommands.setdefault(name, str(page))
            for path in SCRIPT.findall(line):
                scripts.setdefault(path, str(page))
    return subcommands, scripts


def check_subcommands(subcommands: dict[str, str]) -> list[str]:
    """Each named subcommand exists and its --help runs (argparse in-process: what
    `megarlhf <command> --help` does before anything else)."""
    from megarlhf.cli import build_parser

    parser = build_parser()
    known = parser._subparsers._group_actions[0].choices
    problems = []
    for name, page in subcommands.items():
        if name not in known:
            problems.append(f"{page}: `megarlhf {name}`: no such command (known: {', '.join(known)})")
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            parser.parse_args([name, "--help"])
        if exit_.value.code != 0 or f"megarlhf {name}" not in out.getvalue():
            problems.append(f"{page}: `megarlhf {name} --help` failed: {out.getvalue()[-500:]}")
    return problems


# Runs every script's `--help` in one interpreter (runpy, as `python script --help` would),
# so torch and friends are imported once; prints {path: [exit code, output tail]} as JSON.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
results = {}
for path in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [path, "--help"]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        code, out = 1, io.StringIO(repr(e))
    results[path] = [code, out.getvalue()[-300:]]
print("RESULTS" + json.dumps(results))
"""


def check_scripts(scripts: dict[str, str], root: Path = REPO) -> list[str]:
    problems, present = [], []
    for path, page in scripts.items():
        if (root / path).is_file():
            present.append(path)
        else:
            problems.append(f"{page}: `python {path}`: no such script")
    if present:
        out = subprocess.run([sys.executable, "-c", HELP_RUNNER, *present], cwd=root, capture_output=True,
                             text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(root)})  # fmt: skip
        results = json.loads(out.stdout.split("RESULTS", 1)[1]) if "RESULTS" in out.stdout else {}
        for path in present:
            code, tail = results.get(path, [None, out.stderr[-500:]])
            if code != 0:
                problems.append(f"{scripts[path]}: `python {path} --help` exited {code}: {tail}")
    return problems


# --- the repository's docs ---------------------------------------------------------------


def test_every_relative_link_resolves():
    assert check_links(doc_files()) == []


def test_every_command_in_the_docs_exists_and_its_help_runs():
    subcommands, scripts = commands(doc_files())
    # The docs name the stages and tools users run; an empty scan would prove nothing.
    assert {"sft", "rm", "dpo", "ppo", "grpo", "quickstart", "launch", "plan", "selfcheck"} <= set(subcommands)
    assert {"tools/convert_hf_to_megatron.py", "tools/train_tokenizer.py", "tools/plan_rlhf.py"} <= set(scripts)
    assert check_subcommands(subcommands) + check_scripts(scripts) == []


def test_top_level_help_runs():
    out = subprocess.run([sys.executable, "-m", "megarlhf", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert out.returncode == 0 and "--quiet" in out.stdout, out.stderr


def test_config_reference_is_current():
    from megarlhf.config.docs import COMMAND, OUTPUT, render

    assert OUTPUT.read_text() == render(), f"docs/config.md is stale: run `{COMMAND}`"


def test_config_reference_covers_every_stage():
    from megarlhf.cli import STAGES
    from megarlhf.config import docs

    assert list(docs.STAGES) == list(STAGES)
    assert {cls.__name__ for cls in docs.STAGES.values()} == {row[1] for row in STAGES.values()}


def test_old_benchmark_paths_run_the_new_ones():
    shims = [p for p in sorted((REPO / "tools").glob("*.py")) if "Moved to tools/bench/" in p.read_text()]
    assert len(shims) == 10
    for shim in shims:
        new = re.search(r"Moved to (tools/bench/\w+\.py)", shim.read_text()).group(1)
        assert (REPO / new).is_file(), shim
    out = subprocess.run([sys.executable, "tools/bench_ppo.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert out.returncode == 0 and "tools/bench/ppo_vs_trl.py" in out.stderr and "--skip-trl" in out.stdout


# --- the checkers catch what they are for ------------------------------------------------


def test_checker_reports_a_planted_dead_link_and_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A `code` heading: here\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\nGood: [other](other.md), [anchor](other.md#a-code-heading-here), [self](#page).\n"
        "Dead: [gone](missing.md) and [bad anchor](other.md#nowhere).\n"
        "```bash\n[not a link](inside-code.md)\n```\n`[nor](this.md)`\n"
    )
    problems = check_links([page])
    assert len(problems) == 2, problems
    assert "missing.md" in problems[0] and "no such file" in problems[0]
    assert "#nowhere" in problems[1] and "other.md" in problems[1]


def test_checker_reports_planted_bad_commands(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nmegarlhf --quiet sft --config x.yaml\nmegarlhf nosuchcommand --x\n"
                    "torchrun --nproc-per-node 2 tools/nosuch.py --tp 2\n```\n")  # fmt: skip
    subcommands, scripts = commands([page])
    assert set(subcommands) == {"sft", "nosuchcommand"} and set(scripts) == {"tools/nosuch.py"}
    problems = check_subcommands(subcommands) + check_scripts(scripts)
    assert len(problems) == 2, problems
    assert "megarlhf nosuchcommand" in problems[0] and "tools/nosuch.py" in problems[1]


def test_github_slugs():
    assert github_slug("Generation vs `transformers.generate`") == "generation-vs-transformersgenerate"
    assert github_slug("ppo: critic_layout") == "ppo-critic_layout"
    assert github_slug("SLURM: launch, pipelines and preemption") == "slurm-launch-pipelines-and-preemption"
    assert github_slug("GRPO, Dr. GRPO, RLOO, REINFORCE++") == "grpo-dr-grpo-rloo-reinforce"
