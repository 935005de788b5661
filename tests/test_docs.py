"""The README and docs/ say what is true: their code runs as written, their tests exist.

Conventions (README, "Code on these pages"; docs/usage.md):

- Every fenced block is ``python``, ``sh`` or ``text``. ``text`` shows output and is not
  run. A block right after an HTML comment ``<!-- not-tested: why -->`` is not run.
- A page's blocks run in order, from a scratch directory that looks like the repository
  root (its top-level entries linked in, ``.venv`` the interpreter running the tests), in
  one shell session: what a ``sh`` block exports reaches the blocks after it. The session
  starts without the venv's ``bin`` on ``PATH``, so a page has to say how ``ansible-playbook``
  is found. ``python`` blocks are complete programs, run with ``.venv/bin/python FILE``.
- Every test a page names as ``tests/test_x.py::test_name`` exists.

Also: the README's test command is the one ``.ci/run`` runs, and the main example shows
that the patch ran (and that it did not, with ``--stock``).
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_TIMEOUT = 300  # seconds; the longest block (a benchmark's short form) takes about a minute idle
NOT_TESTED = re.compile(r"^<!-- not-tested: \S.* -->$")
FENCE = re.compile(r"^(`{3,})(.*)$")
TEST_ID = re.compile(r"tests/(test_\w+\.py)::(\w+)")
TEST_FILE = re.compile(r"tests/(test_\w+\.py)\b")

# Output a block must print (a regular expression), keyed by a line of the block: exit
# status 0 alone would let a job that failed (rc 127, say) pass.
EXPECTED_OUTPUT = {
    'r = ansible_runner.run(private_data_dir="demo", playbook="site.yml")': r"^successful 0$",
    "runner = await aio.run(": r"^successful 0$",
    "async for event in job:": r"playbook_on_stats\n(.*\n)*successful 0",
    "for runner in await asyncio.gather(*jobs):": r"^(successful 0\n){4}",
    'await asyncio.wait_for(aio.run(private_data_dir="demo", playbook="sleep.yml"': r"^timed out",
    "runner_spawn.install(terminal=True)": r"^successful 0$",
    ".venv/bin/python -m runner_spawn ansible-runner run demo -p site.yml": r"(PLAY RECAP(.*\n)*){2}",
    ".venv/bin/python -m runner_spawn doctor": r"result: OK",
    'curl -sN -X POST localhost:8080/jobs -d \'{"playbook": "site.yml"}\'': r"successful",
    ".venv/bin/python benchmarks/run.py --quick": r"\| metric \|",
    ".venv/bin/python examples/fleet/run.py": r"^processes left: 0$",
    ".venv/bin/runner-spawn run -- .venv/bin/ansible-runner run demo -p site.yml": r"PLAY RECAP",
}
NEVER_IN_OUTPUT = ("Traceback (most recent call last)", "The command was not found or was not executable")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    tested: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, in order."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: unclosed code block"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        tested = not NOT_TESTED.match(before)
        out.append(Block(page, i + 1, info.split()[0] if info else "", "\n".join(lines[i + 1 : end]) + "\n", tested))
        i = end + 1
    return out


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_every_block_says_what_it_is() -> None:
    found = [b for page in PAGES for b in blocks(page)]
    assert len(found) > 20, "the pages lost their code blocks, or the parser broke"
    wrong = [f"{b.where}: {b.lang or '(no language)'}" for b in found if b.lang not in ("python", "sh", "text")]
    assert not wrong, "code blocks must be python, sh or text:\n" + "\n".join(wrong)
    untested = [b.where for b in found if not b.tested]
    assert len(untested) <= 12, f"keep blocks that are not run to a minimum: {untested}"


def test_named_tests_exist() -> None:
    """Each ``tests/test_x.py::test_name`` on a page is a test function of that file."""
    defined: dict[str, set[str]] = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        defined[path.name] = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    named = 0
    missing = []
    for page in PAGES:
        text = page.read_text()
        for m in TEST_ID.finditer(text):
            named += 1
            if m.group(2) not in defined.get(m.group(1), set()):
                missing.append(f"{_page_id(page)}: tests/{m.group(1)}::{m.group(2)}")
        for m in TEST_FILE.finditer(text):
            if m.group(1) not in defined:
                missing.append(f"{_page_id(page)}: tests/{m.group(1)}")
    assert named > 100, f"only {named} tests named: the pattern or the pages changed"
    assert not missing, "the docs name tests that do not exist:\n" + "\n".join(missing)


def _slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"[`*_]", "", heading)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_readme_links_resolve() -> None:
    """The README is read outside MkDocs (which checks the docs' own links): check its links here."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert links
    broken = []
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = ROOT / target
        if not path.is_file():
            broken.append(link)
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(link)
    assert not broken, f"README links to missing files or anchors: {broken}"


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci if '.venv/bin/pip install -q -e ".[test]"' in line)
    assert command.startswith("python3 -m venv .venv && ")
    for page in (ROOT / "README.md", ROOT / "docs" / "usage.md"):
        assert command in [b.code.strip() for b in blocks(page)], f"{_page_id(page)} lost the test command {command!r}"


def _runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.tested and b.lang in ("python", "sh")]


def _scratch_root(tmp: Path) -> Path:
    """A directory that looks like the repository root; .venv is the running interpreter's."""
    tmp.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".venv", ".git") and not entry.name.startswith(".pytest"):
            (tmp / entry.name).symlink_to(entry)
    (tmp / ".venv").symlink_to(Path(sys.prefix))
    assert (tmp / ".venv" / "bin" / "python").exists(), "the tests run in an environment without bin/python"
    return tmp


def _session_env() -> dict[str, str]:
    """A user's shell: the venv not activated (its bin not on PATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VIRTUAL_ENV"))}
    venv_bins = {os.path.dirname(sys.executable), str(Path(sys.prefix) / "bin")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p not in venv_bins)
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str], where: str) -> str:
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{where}: still running after {BLOCK_TIMEOUT} s:\n{out[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # what the block left in its group (a server, say)
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"{where}: exit status {proc.returncode}:\n{out[-5000:]}"
    return out


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p)], ids=_page_id)
def test_code_blocks_run_as_written(page: Path, tmp_path: Path) -> None:
    todo = _runnable(page)
    root = _scratch_root(tmp_path / "repo")
    env = _session_env()
    env_file = tmp_path / "env"
    for n, b in enumerate(todo):
        if b.lang == "sh":
            script = f"set -eo pipefail\n{b.code}\nenv -0 > {env_file}\n"
            out = _run(["bash", "-c", script], root, env, b.where)
            env = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
        else:
            program = root / f"block{n}.py"
            program.write_text(b.code)
            out = _run([".venv/bin/python", program.name], root, env, b.where)
        for bad in NEVER_IN_OUTPUT:
            assert bad not in out, f"{b.where}: {bad!r} in the output:\n{out[-5000:]}"
        for key, pattern in EXPECTED_OUTPUT.items():
            if key in b.code:
                assert re.search(pattern, out, re.M), f"{b.where}: no {pattern!r} in the output:\n{out[-5000:]}"


def test_expected_outputs_belong_to_blocks() -> None:
    """Each EXPECTED_OUTPUT key is still a line of a block that runs (or the check is void)."""
    code = "".join(b.code for page in PAGES for b in blocks(page) if b.tested)
    stale = [key for key in EXPECTED_OUTPUT if key not in code]
    assert not stale, f"no block runs these any more: {stale}"


EXAMPLE = ROOT / "examples" / "run_playbooks.py"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stock", [False, True], ids=["patched", "stock"])
def test_main_example_shows_whether_the_patch_ran(stock: bool) -> None:
    argv = [sys.executable, str(EXAMPLE), "--jobs", "4", *(["--stock"] if stock else [])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"^job\d+ ", line)]
    assert len(rows) == 4, proc.stdout
    forks = int(re.search(r"Python at-fork callbacks while the jobs ran: (\d+)", proc.stdout).group(1))  # type: ignore[union-attr]
    for row in rows:
        expected, status, spawn, marker, session, stdio = row[2], row[3], *row[6:10]
        assert status == expected, proc.stdout
        assert session == "own", proc.stdout
        n_marked, n_seen = map(int, marker.split("/"))
        assert n_seen >= 1, proc.stdout
        if stock:
            assert (spawn, stdio, n_marked) == ("pexpect.spawn", "pty", 0), proc.stdout
        else:
            assert (spawn, stdio, n_marked) == ("RunnerSpawn", "pipe", n_seen), proc.stdout
    if stock:
        assert forks >= 4, proc.stdout  # pty.fork runs Python at-fork callbacks once per job
    else:
        assert forks == 0, proc.stdout
        assert "in effect" in proc.stdout and "NOT in effect" not in proc.stdout, proc.stdout


def test_main_example_rejects_zero_jobs() -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--jobs", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "argument --jobs: 0 jobs: give 1 or more" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_doctor_sample_is_what_the_doctor_prints() -> None:
    """docs/usage.md's doctor report is the doctor's output here, up to paths and versions."""
    page = ROOT / "docs" / "usage.md"
    found = blocks(page)
    at = next(i for i, b in enumerate(found) if b.code.strip() == ".venv/bin/python -m runner_spawn doctor")
    sample = found[at + 1]
    assert sample.lang == "text", f"{sample.where}: the doctor's sample report follows its command"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_SPAWN_ACTIVATE")}
    proc = subprocess.run(
        [sys.executable, "-m", "runner_spawn", "doctor"], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def shape(text: str, prefix: str) -> list[str]:
        text = text.replace(prefix, "PREFIX")
        text = re.sub(r"\d+(\.\d+)+", "V", text)
        return [" ".join(line.split()) for line in text.strip().splitlines()]

    assert shape(sample.code, "/srv/app/venv") == shape(proc.stdout, sys.prefix)
