"""Where prefkd caches derived files, and the fingerprints that key them (a changed input never hits a stale entry)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    """prefkd's cache: PREFKD_CACHE or ~/.cache/prefkd."""
    return Path(os.environ.get("PREFKD_CACHE") or Path.home() / ".cache" / "prefkd").expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its class, EOS, and the backend's JSON (fast tokenizers,
    without the call-dependent padding/truncation state) or its vocabulary (slow ones)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(repr((tokenizer.eos_token, tokenizer.eos_token_id)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
        # The JSON starts with version, truncation, padding (state a call may change), then added_tokens, ...
        cut = text.find('"added_tokens":')
        if cut >= 0:
            h.update(text[cut:].encode())
        else:
            spec = json.loads(text)
            spec.pop("padding", None)
            spec.pop("truncation", None)
            h.update(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
        h.update(repr(sorted((k, repr(v)) for k, v in getattr(tokenizer, "init_kwargs", {}).items())).encode())
    return h.hexdigest()
