"""The README's usage example runs as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    """Each marked block runs as written and prints what its comments say, from a folder outside the checkout
    (as after `pip install kdiff-align`: 'configs/NAME.json' is then the shipped config NAME)."""
    text = (ROOT / 'README.md').read_text()
    blocks = re.findall(r'<!-- example: .*? -->\n```python\n(.*?)```', text, re.S)
    assert len(blocks) == 2, 'README.md lost a tested usage example'
    monkeypatch.chdir(tmp_path)
    expected = ['torch.Size([4, 1, 8, 8]) 2.0', 'torch.Size([4, 2])\ntorch.Size([4, 2])']
    for block, out in zip(blocks, expected):
        exec(compile(block, 'README.md', 'exec'), {})
        assert capsys.readouterr().out.strip() == out
