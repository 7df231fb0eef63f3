"""The README's first command, run for real: what it shows the embedded model printing (issue 10 item 21: an
honest demo) is what `export` + `run` print, token counts included (speeds vary and are not compared)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_parts() -> tuple[list[str], list[str], str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.*?)\n", text).group(1)
    steps = [shlex.split(part) for part in first.split(" && ")]
    export = next(s for s in steps if s[:3] == ["python", "cli.py", "export"])
    run = next(s for s in steps if s[:3] == ["python", "cli.py", "run"])
    shown = re.search(r"The\s+first command ends with[^\n]*\n\n```\n(.*?)```", text, re.S).group(1)
    return export, run, shown


def test_readme_demo_output_is_what_the_first_command_prints(tmp_path):
    export, run, shown = _readme_parts()
    out = tmp_path / "bundles" / "default"
    export = [a if a != "bundles/default" else str(out) for a in export]
    run = [a if a != "bundles/default" else str(out) for a in run]
    r = subprocess.run([sys.executable, *export[1:]], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "verification: PASS" in r.stdout
    r = subprocess.run([sys.executable, *run[1:]], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    *text, stats = shown.rstrip("\n").split("\n")
    assert r.stdout == "\n".join(text) + "\n"
    counts = re.sub(r"[\d.]+ tok/s", "X tok/s", stats)
    assert counts in re.sub(r"[\d.]+ tok/s", "X tok/s", r.stderr), (stats, r.stderr)
