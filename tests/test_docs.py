"""The documentation: `mkdocs build --strict` passes (broken links, missing anchors, pages left out of
the nav all fail it), and every page the README links to exists."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (tmp_path / "site" / "deploy" / "index.html").is_file()


def test_readme_links_resolve_and_it_stays_short():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\((docs/[^)#]*)", readme)
    assert len(targets) >= 12
    for target in targets:
        assert (REPO / target).exists(), target
    assert len(readme.splitlines()) < 120  # the reference material lives in docs/
