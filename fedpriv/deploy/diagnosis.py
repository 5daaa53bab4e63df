"""Why a SuperNode (or the SuperLink) stopped, read from its log in one line."""

from __future__ import annotations

import re
from pathlib import Path

_REFUSALS: list[tuple[str, str]] = [
    (r"CERTIFICATE_VERIFY_FAILED|certificate verify failed",
     "TLS: the SuperLink's certificate is not signed by the CA this SuperNode trusts (--root-certificates)"),
    (r"\[code: 2004\]",
     "authentication: the SuperLink does not know this SuperNode's public key (register it: flwr supernode register <key.pub> <connection>)"),
    (r"\[code: 2001\]",
     "authentication: the SuperLink accepts registered SuperNodes only and this one presented no key (--auth-supernode-private-key)"),
    (r"Exit Code: 303",
     "authentication needs TLS: this SuperNode has a private key but runs --insecure"),
    (r"Unable to parse the private key file",
     "authentication: the private key file is not an OpenSSH ECDSA key"),
    (r"WRONG_VERSION_NUMBER|record layer failure|wrong version number",
     "TLS mismatch: one side speaks TLS and the other does not (--insecure on one side only)"),
    (r"address already in use|Errno 98",
     "a port is already in use"),
]


def diagnose(log_text: str) -> str:
    """One line: why a SuperNode (or SuperLink) stopped, from its log."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", log_text)
    hint = next((h for pattern, h in _REFUSALS if re.search(pattern, clean, re.IGNORECASE)), None)
    detail = ""
    m = re.search(r"Exit Code: (\d+)\s*\n(.*)\n(.*)", clean)
    if m:
        lines = [ln.strip() for ln in (m.group(2), m.group(3)) if ln.strip()]
        detail = f"Flower exit code {m.group(1)}: " + " ".join(lines)
    else:
        errors = [ln.strip() for ln in clean.splitlines() if re.search(r"ERROR|Error|error", ln)]
        if errors:
            detail = errors[-1]
        else:
            tail = [ln.strip() for ln in clean.splitlines() if ln.strip()]
            detail = tail[-1] if tail else "no output"
    detail = detail[:300]
    return f"{hint} [{detail}]" if hint else detail


def read_log(path: str | Path) -> str:
    """A log file's text ("" if it cannot be read)."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""
