"""The README's usage example runs as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs(monkeypatch, capsys):
    text = (ROOT / 'README.md').read_text()
    match = re.search(r'<!-- example: .*? -->\n```python\n(.*?)```', text, re.S)
    assert match, 'README.md lost its tested usage example'
    monkeypatch.chdir(ROOT)
    exec(compile(match.group(1), 'README.md', 'exec'), {})
    assert capsys.readouterr().out.strip() == 'torch.Size([4, 1, 8, 8]) 2.0'
