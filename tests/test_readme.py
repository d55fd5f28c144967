"""The README's usage example runs as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_examples_run(monkeypatch, capsys):
    """Each marked block runs as written and prints what its comments say."""
    text = (ROOT / 'README.md').read_text()
    blocks = re.findall(r'<!-- example: .*? -->\n```python\n(.*?)```', text, re.S)
    assert len(blocks) == 2, 'README.md lost a tested usage example'
    monkeypatch.chdir(ROOT)
    expected = ['torch.Size([4, 1, 8, 8]) 2.0', 'torch.Size([4, 2])\ntorch.Size([4, 2])']
    for block, out in zip(blocks, expected):
        exec(compile(block, 'README.md', 'exec'), {})
        assert capsys.readouterr().out.strip() == out
