"""The LaTeX tables compile: every generated .tex file in a document with booktabs, by pdfLaTeX when
it is installed (Debian: texlive-latex-base texlive-latex-recommended), and always by a structural
check in Python (balanced braces, escaped specials, one \\cline at most per row, as many cells in
each row as the tabular has columns)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from hsat.report.tables import latex_escape, latex_table, write_tables
from test_report import study, study_aa, transfer, whitebox  # noqa: F401  (fixtures)

DOCUMENT = "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n%s\n\\end{document}\n"
SPECIAL = "%_#&"


def _tokens(tex: str):
    """(character, escaped) pairs: a backslash escapes the character after it (\\\\ is one token)."""
    i = 0
    while i < len(tex):
        if tex[i] == "\\" and i + 1 < len(tex):
            yield tex[i + 1], True
            i += 2
        else:
            yield tex[i], False
            i += 1


def _columns(spec: str) -> int:
    return len(re.findall(r"[lcrX]|p\{[^}]*\}", spec))


def latex_problems(tex: str) -> list[str]:
    """What would stop LaTeX or garble the table, in a generated .tex file."""
    problems = []
    depth = 0
    for char, escaped in _tokens(tex):
        if escaped:
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            problems.append("a } closes no {")
            depth = 0
    if depth:
        problems.append(f"{depth} unclosed {{")
    for match in re.finditer(r"\\begin\{tabular\}\{([^}]*)\}(.*?)\\end\{tabular\}", tex, re.S):
        ncols = _columns(match.group(1))
        for row in match.group(2).split("\\\\"):
            row = re.sub(r"\\(toprule|midrule|bottomrule)\b", "", row).strip()
            if row.count("\\cline") > 1:
                problems.append(f"several \\cline on one row: {row[:80]}")
            row = re.sub(r"\\cline\{[^}]*\}", "", row).strip()
            if not row:
                continue
            cells = re.split(r"(?<!\\)&", row)
            width = sum(int(m.group(1)) if (m := re.match(r"\s*\\multicolumn\{(\d+)\}", c)) else 1 for c in cells)
            if width != ncols:
                problems.append(f"a row of {width} cells in a tabular of {ncols} columns: {row[:80]}")
    text = re.sub(r"\\label\{[^}]*\}", "", tex)  # a label is a name: _ is fine there
    outside = re.sub(r"\\begin\{tabular\}.*?\\end\{tabular\}", "", text, flags=re.S)
    for name, text in (("text", text), ("caption", outside)):
        allowed = "&" if name == "text" else ""  # & separates the cells of a tabular, nowhere else
        bare = sorted({c for c, escaped in _tokens(text) if not escaped and c in SPECIAL and c not in allowed})
        if bare:
            problems.append(f"unescaped {' '.join(bare)} in the {name}")
    if "\\multirow" in tex:
        problems.append("\\multirow needs the multirow package (texlive-latex-extra)")
    for caption in re.findall(r"\\caption\{([^\n]*)\}", tex):
        if re.match(r"Table \d", caption):
            problems.append(f"the caption repeats the table's number: {caption[:40]}")
    non_ascii = sorted({c for c in tex if ord(c) > 127})
    if non_ascii:
        problems.append(f"characters outside ASCII: {non_ascii}")
    return problems


def test_the_structural_check_finds_what_broke_the_tables():
    assert latex_problems("\\caption{50% of x_y}") == ["unescaped % _ in the text", "unescaped % _ in the caption"]
    assert latex_problems("\\caption{a} }") == ["a } closes no {"]
    two_clines = "\\begin{tabular}{ll}\na & b \\\\\n\\cline{1-2} \\cline{2-2}\nc & d \\\\\n\\end{tabular}"
    assert latex_problems(two_clines) == ["several \\cline on one row: \\cline{1-2} \\cline{2-2}\nc & d"]
    assert "caption repeats" in latex_problems("\\caption{Table 1: x}")[0]
    assert latex_problems("\\begin{tabular}{lll}\na & b \\\\\n\\end{tabular}")[0].startswith("a row of 2 cells")
    assert latex_problems("\\begin{tabular}{ll}\n\\multicolumn{2}{c}{a} \\\\\n50\\% & \\_ \\\\\n\\end{tabular}") == []


def test_latex_escape_and_table_captions():
    assert latex_escape("10% of abmil_ce & #1 {x} ~ ^ \\") == (
        "10\\% of abmil\\_ce \\& \\#1 \\{x\\} \\textasciitilde{} \\textasciicircum{} \\textbackslash{}")
    table = pd.DataFrame({"Method": ["HSAT_v", "HiDisc"], "Acc": ["50.0 ± 1.0", "–"]})
    tex = latex_table(table, "Table 2 (summary): 100% of pairs_x; mean ± std.", "tab:t")
    assert "\\caption{Summary: 100\\% of pairs\\_x; mean $\\pm$ std.}" in tex
    assert "\\caption{White-box robustness}" in latex_table(table, "Table 1: white-box robustness", "tab:t1")
    assert "HSAT\\_v" in tex and "50.0 $\\pm$ 1.0" in tex and latex_problems(tex) == []


def _mil_rows(whitebox: pd.DataFrame) -> pd.DataFrame:
    """The ABMIL classifier's rows, whose PGD runs under abmil_ce: Table 5's caption then names it."""
    rows = whitebox[(whitebox["classifier"] == "linear") & (whitebox["level"] != "patch")
                    & whitebox["attack"].isin(["none", "pgd", "worst_case"])
                    & whitebox["objective"].isin(["none", "linear_ce", "all"])]
    return rows.assign(classifier="abmil", objective=rows["objective"].replace({"linear_ce": "abmil_ce"}))


@pytest.fixture
def tex_tables(whitebox, transfer, study_aa, tmp_path):  # noqa: F811  (fixtures)
    with_mil = pd.concat([whitebox, _mil_rows(whitebox)], ignore_index=True)
    write_tables(with_mil, transfer, study_aa, tmp_path)
    paths = sorted(tmp_path.glob("*.tex"))
    assert [p.name for p in paths] == [f"table{i}.tex" for i in range(1, 6)]
    assert "abmil\\_ce" in (tmp_path / "table5.tex").read_text()  # the caption that had a bare _
    return paths


def test_every_generated_table_passes_the_structural_check(tex_tables):
    for path in tex_tables:
        assert latex_problems(path.read_text(encoding="utf-8")) == [], path.name


def test_both_protocols_and_the_attacked_subset_pass_the_structural_check(whitebox, transfer, study_aa, tmp_path):  # noqa: F811
    head = whitebox[whitebox["objective"] == "feature"].assign(objective="head")
    coverage = {"patches": 12, "slides": 12, "patients": 7, "slides_total": 14, "patients_total": 7}
    write_tables(pd.concat([whitebox, head], ignore_index=True), transfer, study_aa, tmp_path, coverage=coverage)
    tex = (tmp_path / "table1.tex").read_text(encoding="utf-8")
    assert "PGD 8/255 (head)" in tex and "12 of 14 validation slides" in tex
    for path in sorted(tmp_path.glob("*.tex")):
        assert latex_problems(path.read_text(encoding="utf-8")) == [], path.name


def compile_latex(tex_files: list[Path], workdir: Path) -> subprocess.CompletedProcess:
    """pdfLaTeX on one article that \\input's every file."""
    body = "\n\\clearpage\n".join(f"\\input{{{p.resolve().as_posix()}}}" for p in tex_files)
    (workdir / "tables.tex").write_text(DOCUMENT % body, encoding="utf-8")
    return subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", "tables.tex"],
                          cwd=workdir, capture_output=True, text=True, timeout=300)


def latex_missing() -> str | None:
    """Why pdfLaTeX cannot run here, or None."""
    if shutil.which("pdflatex") is None:
        return "pdflatex is not installed (Debian: apt-get install texlive-latex-base texlive-latex-recommended)"
    found = subprocess.run(["kpsewhich", "booktabs.sty"], capture_output=True, text=True)
    if not found.stdout.strip():
        return "booktabs.sty is not installed (Debian: apt-get install texlive-latex-recommended)"
    return None


def test_every_generated_table_compiles_with_pdflatex(tex_tables, tmp_path):
    reason = latex_missing()
    if reason:
        pytest.skip(reason)
    build = tmp_path / "build"
    build.mkdir()
    proc = compile_latex(tex_tables, build)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("!")]
    assert proc.returncode == 0 and (build / "tables.pdf").is_file(), errors or proc.stdout[-3000:]
