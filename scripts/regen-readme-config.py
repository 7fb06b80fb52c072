"""Regenerate the README's config reference table from flower_llm.config."""

from pathlib import Path

from flower_llm.config import config_reference_markdown

HEADER = "| key | default | meaning |"

readme = Path(__file__).resolve().parents[1] / "README.md"
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
lines[start:end] = config_reference_markdown().split("\n")
readme.write_text("\n".join(lines))
print("README config reference regenerated")
