"""Real text that ships with Python and its PyPI packages, as byte streams per domain (no downloads).

    DOMAINS                                    ("code", "docs", "legal")
    domain_text(name, max_bytes=None) -> bytes the domain's text, deterministic for one installation
    split_blocks(data, block=4096, every=5) -> (train: bytes, heldout: bytes)
                                               every `every`-th block of `block` bytes is held out
    corpus(max_bytes=None) -> {name: (train, heldout)}

Sources (all read in place from the running interpreter's installation):
- code:  the standard library's top-level modules (`<stdlib>/*.py`, sorted by name): Python source.
- docs:  `pydoc_data.topics.topics` (the Python language reference and library topics as plain English
         prose, the text `help()` shows), sorted by topic name.
- legal: the licence files of every installed distribution (`*.dist-info/LICENSE*`, `COPYING*`,
         `licenses/*`), sorted by path, each distinct text once (byte-identical copies dropped).
The held-out blocks (`split_blocks`) are never trained on; traces are recorded on them. A domain with no
text here (e.g. no licence files) raises HotExpertsError naming it.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

from hotexperts.errors import HotExpertsError

DOMAINS = ("code", "docs", "legal")
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")


def _code() -> bytes:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    return b"".join(f"# ---- {p.name}\n".encode() + p.read_bytes() + b"\n" for p in files)


def _docs() -> bytes:
    from pydoc_data.topics import topics  # stdlib data module: imported only when the docs domain is read

    return "".join(f"{name}\n{'*' * len(name)}\n\n{topics[name]}\n" for name in sorted(topics)).encode()


def _license_files(site: Path) -> list[Path]:
    found = [p for p in site.glob("*.dist-info/*")
             if p.is_file() and p.name.upper().startswith(LICENSE_PREFIXES)]
    found += [p for p in site.glob("*.dist-info/licenses/**/*") if p.is_file()]
    return sorted(set(found))


def _legal() -> bytes:
    seen, out = set(), []
    for p in _license_files(Path(sysconfig.get_paths()["purelib"])):
        data = p.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen or b"\0" in data:
            continue
        seen.add(digest)
        out.append(data.rstrip() + b"\n\n")
    return b"".join(out)


_READERS = {"code": _code, "docs": _docs, "legal": _legal}


def domain_text(name: str, max_bytes: int | None = None) -> bytes:
    """The domain's text (first max_bytes bytes when given)."""
    if name not in _READERS:
        raise HotExpertsError(f"unknown text domain {name!r}; known: {', '.join(DOMAINS)}")
    data = _READERS[name]()
    if not data:
        raise HotExpertsError(f"text domain {name!r} has no text on this installation")
    return data[:max_bytes] if max_bytes is not None else data


def split_blocks(data: bytes, block: int = 4096, every: int = 5) -> tuple[bytes, bytes]:
    """(train, heldout): block i of `block` bytes is held out when i % every == every - 1."""
    if block < 1 or every < 2:
        raise HotExpertsError(f"split_blocks needs block >= 1 and every >= 2, got {block}, {every}")
    blocks = [data[i:i + block] for i in range(0, len(data), block)]
    held = [b for i, b in enumerate(blocks) if i % every == every - 1]
    train = [b for i, b in enumerate(blocks) if i % every != every - 1]
    return b"".join(train), b"".join(held)


def corpus(max_bytes: int | None = None, block: int = 4096, every: int = 5) -> dict[str, tuple[bytes, bytes]]:
    """{domain: (train, heldout)} for every domain."""
    return {d: split_blocks(domain_text(d, max_bytes), block, every) for d in DOMAINS}
