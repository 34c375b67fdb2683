"""The README's commands are what CI runs, verbatim."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci
    assert ci in readme, "the last line of .ci/run must be the README's test command"


def test_math_sections_cited_in_the_repository_exist():
    """Every section anchor of docs/math.md cited in code and docs names one of its headings,
    with GitHub's anchor rule (lower case, punctuation dropped, spaces to -)."""
    import re

    headings = re.findall(r"^#+ (.+)$", (ROOT / "docs" / "math.md").read_text(), flags=re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    cited = set()
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("unidd_fast/**/*.py"),
                 *ROOT.glob("kernels/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]:
        cited |= {(path.name, a) for a in re.findall(r"math\.md#([\w\-]+)", path.read_text())}
    assert {"emu", "the-cfm-loss"} <= {a for _, a in cited}
    assert not [c for c in cited if c[1] not in anchors], anchors
