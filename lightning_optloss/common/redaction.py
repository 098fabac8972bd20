"""Credentials out of everything lightning_optloss prints, logs, writes or records.

A tracking URI may carry a password (``http://user:password@host``) or a token in its query
(``?token=...``, ``access_token``, ``api_key``, ``password``, ``secret``, ``sig``...). :func:`redact` replaces
those with ``***`` in any text: a URI, an error message that quotes a URL, a param value.

>>> redact("http://alice:s3cret@mlflow.example:5000/api?token=abc&x=1")
'http://alice:***@mlflow.example:5000/api?token=***&x=1'
"""

from __future__ import annotations

import re

MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<password>[^@/\s]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;](?:[\w-]*token|password|passwd|pwd|secret|[\w-]*key|sig|signature|auth|credentials?)=)"
    r"(?P<value>[^&#;\s'\"]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with URI passwords and secret query values replaced by ``***`` (other text unchanged)."""
    if "@" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}{MASK}", text)
