"""Every `snakemake ...` command line the documentation shows works as written, and every
command of the README (make, snakemake and dvc) is dry-run.

The commands are read from README.md and docs/*.md (fenced code blocks and inline code) and from
the comments of the Snakefile, rules/*.smk, config/*.yaml and profiles/*/config.yaml. Each one is
parsed with Snakemake's own argument parser (a target must stay a target: `--configfile`,
`--resources`, `--config` and `--sdm` take several values and swallow a target that follows them)
and dry-run as typed, with `-n` added, in a copy of the workflow. OpenSRH commands plan against
a fake OpenSRH root (the embedded cohort, which has the OpenSRH layout); commands on a file the
docs have the reader write (a ```yaml block headed `# overlay.yaml`) plan against that block.

The README's commands (each line of its ```bash blocks, and inline code that starts with a tool)
must be ones this file can check: `make TARGET` runs as `make -n` and the Snakemake commands it
would run are dry-run; for `dvc repro`, DVC reads dvc.yaml and params.yaml and the Snakemake
commands of its stages are dry-run; other DVC commands must parse and be ones the tiny study runs
under DVC (test_workflow.DVC_COMMANDS), where they are checked for warnings.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.cli import get_argument_parser

from test_workflow import DVC_COMMANDS, REPO, TRACEBACK, _env, copy_workflow, snakemake

DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
COMMENTED = ["Snakefile", *sorted(p.relative_to(REPO).as_posix() for pattern in
             ("rules/*.smk", "config/*.yaml", "profiles/*/config.yaml") for p in REPO.glob(pattern))]

# Placeholders the documentation uses, and what stands in for them here. Any other `<...>` or
# `...` in a command fails the test: add it here, with a value that makes the command concrete.
PLACEHOLDERS = {
    "<config>": sorted(p.relative_to(REPO).as_posix() for p in (REPO / "config").glob("*.yaml")),
    "<name>": ["hsat_s0"],  # a model of the default study
    "<model>": ["hsat_s0"],
}

SNAKEMAKE = re.compile(r"(?:\S*/)?snakemake(?=\s|$)")
INLINE = re.compile(r"`((?:\S*/)?snakemake(?:\s[^`]*)?)`")
FENCE = re.compile(r"^\s*```")


def _commands_in_markdown(path: str) -> list[tuple[str, str]]:
    """(path:line, command) for every snakemake line of a fenced block (continuations joined,
    trailing comments dropped) and every inline code span that starts with `snakemake`."""
    out, prose = [], []
    fenced, pending, start = False, "", 0
    for lineno, line in enumerate((REPO / path).read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            prose.append("")
            continue
        if not fenced:
            prose.append(line)
            continue
        prose.append("")
        if not pending:
            start = lineno
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = pending + line, ""
        if SNAKEMAKE.match(text.strip()):  # other lines need not be shell (the DAG sketch)
            out.append((f"{path}:{start}", shlex.join(shlex.split(text, comments=True))))
    text = "\n".join(prose)
    for m in INLINE.finditer(text):
        lineno = text.count("\n", 0, m.start()) + 1
        out.append((f"{path}:{lineno}", " ".join(m.group(1).split())))
    return out


def _commands_in_comments(path: str) -> list[tuple[str, str]]:
    """(path:line, command) for comment lines that are a snakemake command (`#   snakemake ...`)
    and inline code spans that start with `snakemake`."""
    out = []
    for lineno, line in enumerate((REPO / path).read_text(encoding="utf-8").splitlines(), 1):
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        if SNAKEMAKE.match(comment):
            out.append((f"{path}:{lineno}", shlex.join(shlex.split(comment, comments=True))))
        for m in INLINE.finditer(line):
            out.append((f"{path}:{lineno}", " ".join(m.group(1).split())))
    return out


def files_in_markdown(path: str) -> dict[str, str]:
    """Files the documentation has the reader write: a fenced ```yaml block whose first line is
    `# <name>.yaml` is that file in full (docs/own_data.md's overlay.yaml)."""
    text = (REPO / path).read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r"^```yaml\n# (\S+\.yaml)\n(.*?)^```", text, re.M | re.S)}


READER_FILES = {name: body for p in DOCS for name, body in files_in_markdown(p).items()}


def documented_commands() -> list[tuple[str, str]]:
    """(where, command), one per distinct command, placeholders filled in."""
    found = [c for p in DOCS for c in _commands_in_markdown(p)]
    found += [c for p in COMMENTED for c in _commands_in_comments(p)]
    seen, out = set(), []
    for where, command in found:
        variants = [command]
        for placeholder, values in PLACEHOLDERS.items():
            if placeholder in command:
                variants = [v.replace(placeholder, value) for v in variants for value in values]
        for cmd in variants:
            key = tuple(shlex.split(cmd)[1:])  # `.venv/bin/snakemake x` is `snakemake x`
            if key not in seen:
                seen.add(key)
                out.append((where, cmd))
    return out


README_TOOL = re.compile(r"(?:\.venv/bin/)?(make|snakemake|dvc)(?=\s|$)")
README_INLINE = re.compile(r"`((?:\.venv/bin/)?(?:make|snakemake|dvc) [^`]*)`")
SHELL_FENCE = re.compile(r"^\s*```(bash|sh|shell|console)\s*$")


def readme_commands(path: str = "README.md") -> list[tuple[str, str]]:
    """(path:line, command) for every line of the README's shell blocks (comments dropped) and
    every inline code span that starts with make, snakemake or dvc, one per distinct command."""
    out, fenced, shell = [], False, False
    for lineno, line in enumerate((REPO / path).read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            shell = not fenced and bool(SHELL_FENCE.match(line))
            fenced = not fenced
            continue
        if fenced and shell:
            words = shlex.split(line, comments=True)
            if words:
                out.append((f"{path}:{lineno}", shlex.join(words)))
        elif not fenced:
            out += [(f"{path}:{lineno}", " ".join(m.group(1).split())) for m in README_INLINE.finditer(line)]
    seen: dict[str, str] = {}
    for where, cmd in out:
        seen.setdefault(cmd, where)
    return [(where, cmd) for cmd, where in seen.items()]


README = readme_commands()
COMMANDS = documented_commands()
IDS = [f"{where} {cmd}" for where, cmd in COMMANDS]
RULES = {m.group(1) for f in ["Snakefile", *(p.relative_to(REPO) for p in REPO.glob("rules/*.smk"))]
         for m in re.finditer(r"^rule (\w+):", (REPO / f).read_text(encoding="utf-8"), re.M)}
TARGET = re.compile("|".join([*map(re.escape, sorted(RULES)), r"model_\w+", r"results/\S+\.safetensors"]))


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert SNAKEMAKE.fullmatch(words[0]), command
    return words[1:]


def test_the_documentation_shows_the_commands_this_file_tests():
    """The extraction finds the commands users copy, already with their placeholders filled in."""
    commands = [shlex.join(["snakemake", *shlex.split(cmd)[1:]]) for _, cmd in COMMANDS]  # `.venv/bin/snakemake` too
    for expected in [
        "snakemake all --cores 8 --resources gpu=1 --configfile config/opensrh.yaml",
        "snakemake all --cores 2 --configfile config/tiny.yaml",
        "snakemake --report results/report.html",
        "snakemake --touch all --configfile config/tiny.yaml",
    ]:
        assert expected in commands, commands
    for cmd in commands:
        unknown = "..." in cmd or re.search(r"<\w+>", cmd)
        assert not unknown, f"unknown placeholder in {cmd!r}: add it to PLACEHOLDERS"


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=IDS)
def test_documented_command_keeps_its_targets(command):
    """Snakemake's parser reads every target of the command as a target, not as the value of an
    option before it (`--resources gpu=1 all` used to stop with a ValueError traceback)."""
    argv = _argv(command)
    try:
        args = get_argument_parser().parse_args(argv)
    except (SystemExit, ValueError) as exc:
        pytest.fail(f"snakemake cannot parse {command!r}: {exc!r}")
    targets = [w for w in argv if TARGET.fullmatch(w)]
    assert set(targets) <= set(args.targets), f"{command!r}: targets {targets}, Snakemake read {args.targets}"


@pytest.fixture
def workflow_copy(tmp_path: Path, tiny_cohort: Path, tiny_manifest: Path) -> Path:
    """The workflow (with its profiles) in tmp_path; config/opensrh.yaml points at a fake OpenSRH
    root: the embedded cohort, which has OpenSRH's meta/opensrh.json + meta/train_val_split.json;
    the files the documentation has the reader write (READER_FILES) are there too."""
    copy_workflow(tmp_path, extra=("profiles",))
    opensrh = tmp_path / "config" / "opensrh.yaml"
    cfg = yaml.safe_load(opensrh.read_text(encoding="utf-8"))
    cfg["dataset"]["root"] = str(tiny_cohort)
    opensrh.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    # The paper-scale rehearsal reads the same fake root (its test writes a format-exact one), and
    # the foundation-model overlay's placeholder weights path is the reader's to edit: a file there.
    rehearsal = tmp_path / "config" / "opensrh_rehearsal.yaml"
    cfg = yaml.safe_load(rehearsal.read_text(encoding="utf-8"))
    cfg["dataset"]["root"] = str(tiny_cohort)
    rehearsal.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    foundation = tmp_path / "config" / "foundation.yaml"
    cfg = yaml.safe_load(foundation.read_text(encoding="utf-8"))
    for entry in cfg["models"].values():
        weights = tmp_path / "weights" / Path(entry["model"]["pretrained_path"]).name
        weights.parent.mkdir(exist_ok=True)
        weights.touch()
        entry["model"]["pretrained_path"] = str(weights)
    foundation.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    # The files the docs have the reader write, and a stand-in for the manifest one names (a dry
    # run only needs it to exist: the manifest of the embedded cohort).
    for name, body in READER_FILES.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
        manifest = (yaml.safe_load(body).get("dataset") or {}).get("manifest")
        if manifest and not (tmp_path / manifest).exists():
            (tmp_path / manifest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tiny_manifest, tmp_path / manifest)
        # A dry run only needs the weights files the reader's file names to exist.
        for entry in (yaml.safe_load(body).get("models") or {}).values():
            weights = ((entry or {}).get("model") or {}).get("pretrained_path")
            if weights and not Path(weights).is_absolute():
                (tmp_path / weights).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / weights).touch()
    return tmp_path


def _skip_reason(argv: list[str]) -> str | None:
    """Why this machine cannot plan the command, when the reason is outside the workflow."""
    if "--profile" in argv:
        profile = yaml.safe_load((REPO / argv[argv.index("--profile") + 1] / "config.yaml").read_text(encoding="utf-8"))
        executor = profile.get("executor", "local")
        if executor != "local" and importlib.util.find_spec(f"snakemake_executor_plugin_{executor}") is None:
            # Snakemake rejects an uninstalled executor before it reads the workflow; the docs
            # install it on the line before (`pip install -e ".[slurm]"`).
            return f"the {executor} executor plugin is not installed (pip install -e \".[{executor}]\")"
    sdm = {"--sdm", "--software-deployment-method", "--deployment-method", "--deployment"}
    if sdm & set(argv) and "conda" in argv and shutil.which("conda") is None:
        # Even a dry run asks `conda info` where the environments would go.
        return "--sdm conda needs conda on PATH, even for a dry run"
    return None


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=IDS)
def test_documented_command_dry_runs(workflow_copy, command):
    """The command, with `-n`, plans the study: exit status 0 and no traceback."""
    argv = _argv(command)
    reason = _skip_reason(argv)
    if reason:
        pytest.skip(reason)
    if "--report" in argv:
        # `-n` does not apply to --report: Snakemake builds the report from a finished run's files
        # (the docs say "after a run"). Without a run it must get as far as asking for them, and
        # say which is missing -- the command parses and the workflow loads with its config.
        proc = snakemake(*argv, cwd=workflow_copy)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "marked for report but does not exist" in out, out[-3000:]
    else:
        dry = [] if {"-n", "--dry-run", "--dryrun"} & set(argv) else ["-n"]
        proc = snakemake(*dry, *argv, cwd=workflow_copy)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
    assert not TRACEBACK.search(out), out[-3000:]


def _tool(command: str) -> str | None:
    m = README_TOOL.match(command)
    return m.group(1) if m else None


ACTIVATE = "source .venv/bin/activate"


def test_the_readme_shows_only_commands_this_file_checks():
    """Every README command is make, snakemake or dvc (a new kind needs its dry run here first),
    or activates the environment `make setup` creates; the ones users start with are among them,
    and CI's command (.ci/run's last line) too."""
    commands = [cmd for _, cmd in README]
    if ACTIVATE in commands:
        assert re.search(r"^VENV \?= \.venv$", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
    unknown = [c for c in commands if _tool(c) is None and c != ACTIVATE]
    assert not unknown, f"README commands this test cannot dry-run: {unknown}"
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not re.match(r"(#|set |cd |export )", line.strip())][-1]
    for expected in [ci, "make setup", "make study", "make study-all",
                     ".venv/bin/snakemake all --cores 2 --configfile config/tiny.yaml", "dvc repro"]:
        assert expected in commands, commands
    # The README's snakemake commands are among the documented commands dry-run above.
    dry = {tuple(shlex.split(c)[1:]) for _, c in COMMANDS}
    assert all(tuple(shlex.split(c)[1:]) in dry for c in commands if _tool(c) == "snakemake")


def _dry_run_snakemake_lines(text: str, cwd: Path) -> int:
    """Dry-run (in `cwd`) every Snakemake command line in `text`; return how many there were."""
    lines = [ln.strip().lstrip("> ").strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if SNAKEMAKE.match(ln)]
    for line in lines:
        proc = snakemake("-n", *_argv(line), cwd=cwd)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and not TRACEBACK.search(out), f"{line}: {out[-3000:]}"
    return len(lines)


@pytest.mark.parametrize("command", sorted({c for _, c in README if _tool(c) == "make"}))
def test_readme_make_command_dry_runs(workflow_copy, command):
    """`make -n TARGET` knows the target, and the Snakemake commands it would run plan the study."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, workflow_copy / name)
    words = shlex.split(command)
    proc = subprocess.run(["make", "-n", *words[1:]], cwd=workflow_copy, env=_env(workflow_copy),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stdout + proc.stderr
    ran = _dry_run_snakemake_lines(proc.stdout, workflow_copy)
    assert ran or words[1] in {"setup", "test", "rehearsal", "gpu-check"}, f"{command} runs no Snakemake command: {proc.stdout}"
    if words[1] == "test":
        assert "pytest" in proc.stdout


@pytest.mark.parametrize("command", sorted({c for _, c in README if _tool(c) == "dvc"}))
def test_readme_dvc_command_dry_runs(workflow_copy, command):
    """`dvc repro`: DVC reads dvc.yaml with params.yaml, and every stage's Snakemake command plans
    the study (`dvc repro --dry` itself stops at the first stage whose inputs a fresh clone lacks);
    any other DVC command parses and is one the tiny study runs under DVC (test_workflow.py)."""
    from dvc.cli import parse_args

    argv = shlex.split(command)[1:]
    parse_args(argv)  # raises on an unknown command or option
    assert tuple(w for w in argv if not w.startswith("-"))[:2] in {c[:2] for c in DVC_COMMANDS}, command
    if argv[0] != "repro":
        return
    from dvc.repo import Repo

    dvc = str(Path(sys.executable).parent / "dvc")
    init = subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=workflow_copy, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    with Repo(str(workflow_copy)) as repo:
        stages = {s.name: s.cmd if isinstance(s.cmd, list) else [s.cmd] for s in repo.index.stages}
    assert list(stages) == ["pretrain", "evaluate", "report"], stages
    assert _dry_run_snakemake_lines("\n".join(c for cmds in stages.values() for c in cmds), workflow_copy) == 3, stages
