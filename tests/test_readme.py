"""The README: its usage examples run as written, it stays short, and every relative link in it and in docs/ works."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 12 * 1024  # bytes: a newcomer reads it in five minutes; reference material lives in docs/


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


def test_readme_is_short():
    size = len((ROOT / 'README.md').read_bytes())
    assert size <= README_LIMIT, f'README.md is {size} bytes, over {README_LIMIT}: move reference material to docs/'


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r'^#+ (.+)$', re.sub(r'```.*?```', '', text, flags=re.S), re.M)
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in headings}


def test_relative_links_point_at_existing_files_and_headings():
    pages = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
    broken = []
    for page in pages:
        text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)  # code is not links
        for target in re.findall(r'\[[^\]]*\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+:', target):  # https:, mailto:
                continue
            path, _, anchor = target.partition('#')
            file = (page.parent / path).resolve() if path else page
            if not file.is_file():
                broken.append(f'{page.relative_to(ROOT)}: {target} (no such file)')
            elif anchor and file.suffix == '.md' and anchor not in _anchors(file.read_text()):
                broken.append(f'{page.relative_to(ROOT)}: {target} (no such heading)')
    assert len(pages) > 5 and not broken, broken
