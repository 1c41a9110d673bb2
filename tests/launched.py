"""What a test reads from `coordinator launch`'s output."""

from __future__ import annotations

import re
from pathlib import Path


def admin_key(output: str) -> str:
    """The admin API key a launch made: its file is named in a line of the output (the key itself never is)."""
    found = re.search(r"admin API key in (\S+)", output)
    assert found is not None, f"launch named no admin key file:\n{output}"
    return Path(found.group(1)).read_text().strip()
