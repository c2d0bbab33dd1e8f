"""Print the code blocks of one README section as one script (`sh` or `python`), so CI runs them as written."""

import re
import sys
from pathlib import Path

section, language = sys.argv[1], sys.argv[2]
text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
blocks = re.findall(r"```([a-z]*)\n(.*?)```", body, re.S)
print("\n".join(code for lang, code in blocks if (lang or "sh") == language))
