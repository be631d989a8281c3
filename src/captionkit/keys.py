"""The resume key: which recorded results a run may reuse.

Two runs share a key when their outputs would be the same: the same model (and checkpoint files,
and precision), generation options, decoding and scorer. The key is a versioned digest of that
identity as a dict, so a new part is one new entry, and a part that does not apply is left out
(earlier stores keep their keys).
"""

from __future__ import annotations

import hashlib
import json
import re

VERSION = 2


def resume_key(identity: dict) -> str:
    """`v2:` and a digest of the identity dict (entries with empty values dropped)."""
    kept = {name: value for name, value in identity.items() if value not in (None, "", False)}
    blob = json.dumps(kept, sort_keys=True, ensure_ascii=False)
    return f"v{VERSION}:{hashlib.sha256(blob.encode()).hexdigest()[:20]}"


_DIGEST = re.compile(r"[0-9a-f]{12}")


def identity_of_v1_key(key: str) -> dict | None:
    """The identity a v1 key (`MODEL#GEN[#VARIANT][#files-FP][#full-decode][#SCORER@SCALE]`) stood
    for, or None for a key of another shape (a v2 key, a test's own)."""
    parts = key.split("#")
    # the model id may itself hold '#': the generation digest is the first 12-hex part after it
    at = next((i for i in range(1, len(parts)) if _DIGEST.fullmatch(parts[i])), None)
    if at is None:
        return None
    identity: dict = {"model": "#".join(parts[:at]), "generation": parts[at]}
    for part in parts[at + 1:]:
        if part.startswith("files-"):
            identity["fingerprint"] = part.removeprefix("files-")
        elif part == "full-decode":
            identity["full_decode"] = True
        elif "@" in part:
            identity["scorer"] = part
        else:
            identity["variant"] = part
    return identity
