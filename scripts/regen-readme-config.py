"""Regenerate the README's config reference table: keys and help from flower_llm.config,
defaults from pyproject.toml's [tool.flwr.app.config] (what `flwr run` uses).

tests/test_config.py checks that README.md matches.
"""

from pathlib import Path

from flower_llm.config import app_config, config_reference_markdown

HEADER = "| key | default | meaning |"

root = Path(__file__).resolve().parents[1]
readme = root / "README.md"
lines = readme.read_text().split("\n")
if HEADER not in lines:
    raise SystemExit("README.md has no config reference table to replace")
start = end = lines.index(HEADER)
# A row runs from a line starting with "|" to one ending with "|" (an older table held a
# multi-line cell); the table ends at the first line outside a row that is not a row.
in_row = False
while end < len(lines) and (in_row or lines[end].startswith("|")):
    in_row = not lines[end].rstrip().endswith("|")
    end += 1
# Splice lines, not a regex substitution: re.sub would turn the "\n" escapes inside
# table cells back into real newlines.
lines[start:end] = config_reference_markdown(app_config(root)).split("\n")
readme.write_text("\n".join(lines))
print("README config reference regenerated")
