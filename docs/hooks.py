"""MkDocs hook: the docstrings' Sphinx roles (``:class:`~pkg.Name```) shown as plain code (``Name``).

mkdocstrings renders a role as the text ``:class:`` followed by the code span; this drops the role and, as Sphinx
does for a leading ``~``, keeps only the last part of the dotted name.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([\w.]+)</code>")


def short_name(match: re.Match[str]) -> str:
    tilde, name = match.groups()
    return f"<code>{name.rsplit('.', 1)[-1] if tilde else name}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub(short_name, html)
