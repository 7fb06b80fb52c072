"""Regenerate the README's config reference table from flower_llm.config."""

import re
from pathlib import Path

from flower_llm.config import config_reference_markdown

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
table = re.compile(r"\| key \| default \| meaning \|\n(?:\|.*\|\n?)+")
new, count = table.subn(config_reference_markdown() + "\n", text, count=1)
if count != 1:
    raise SystemExit("README.md has no config reference table to replace")
readme.write_text(new)
print("README config reference regenerated")
