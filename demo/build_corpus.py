"""Build the demo corpus: English prose from the Python 3.11 documentation.

Source: the reStructuredText sources of the Python documentation as shipped by
Debian's ``python3.11-doc`` package (``/usr/share/doc/python3.11/html/_sources``),
licensed under the PSF License Agreement (see ``/usr/share/doc/python3.11/copyright``).
Install it with ``apt-get install python3.11-doc``.

Markup, code blocks, interactive sessions, directives and tables are stripped, so
what remains is the documentation's running English prose. Files are split into
train / valid / test by a hash of their relative path (about 85 / 5 / 10 percent),
so no document is shared between splits. ``train.txt`` is rebuilt by this script;
``valid.txt.gz`` and ``test.txt.gz`` are small and committed. The output is deterministic: the same
package version gives byte-identical files (their sha256 are written to
``manifest.json``).

    python demo/build_corpus.py --out demo/data
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

SOURCE = Path("/usr/share/doc/python3.11/html/_sources")
SKIP_DIRS = {"c-api", "distutils", "includes"}
SKIP_FILES = {"license.rst.txt", "copyright.rst.txt", "contents.rst.txt", "about.rst.txt", "bugs.rst.txt"}

_ROLE = re.compile(r":[a-zA-Z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_REF = re.compile(r"`([^`]+)`_+")
_LITERAL = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"\*\*?([^*\n]+?)\*\*?")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_FOOTREF = re.compile(r"\s*\[#[^\]]*\]_")
# directives whose bodies are code, tables or navigation rather than prose
_SKIP_BODY = re.compile(
    r"^\.\. (code-block|sourcecode|code|literalinclude|doctest|testcode|testoutput|testsetup|testcleanup|"
    r"productionlist|table|csv-table|list-table|toctree|index|image|figure|raw|only|highlight|"
    r"moduleauthor|sectionauthor|audit-event-table|availability|opcode|cmdoption|envvar|grammar-snippet)::"
)


def _inline(text: str) -> str:
    text = _ROLE.sub(lambda m: m.group(1), text)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = _REF.sub(lambda m: m.group(1), text)
    text = _LITERAL.sub(lambda m: m.group(1), text)
    text = _EMPH.sub(lambda m: m.group(1), text)
    text = _FOOTREF.sub("", text)
    return re.sub(r"\s+", " ", text).strip()


def prose_paragraphs(rst: str) -> list[str]:
    """Return the prose paragraphs of one reST document, markup stripped."""
    paragraphs: list[str] = []
    block: list[str] = []
    skip_indent: int | None = None  # inside a directive / literal block: skip deeper-indented lines

    def flush() -> None:
        if block:
            text = _inline(" ".join(block))
            # keep sentences, drop headings, list debris and table fragments
            if len(text) >= 80 and text[-1] in ".:;?!)\"'" and "|" not in text:
                paragraphs.append(text.rstrip(":") + ("." if text.endswith(":") else ""))
            block.clear()

    for raw in rst.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line or indent > skip_indent:
                continue
            skip_indent = None
        stripped = line.strip()
        if not stripped:
            flush()
            continue
        if stripped.startswith(".. ") or stripped.startswith(">>>") or _UNDERLINE.match(stripped):
            flush()
            # comments, targets and code/table directives: skip their indented body too;
            # descriptive directives (function, class, note, ...) keep their prose body
            if _SKIP_BODY.match(stripped) or not re.match(r"^\.\. [\w:-]+::", stripped):
                skip_indent = indent
            continue
        if stripped.startswith(("+", "|", "* ", "- ", "#. ")) or re.match(r"^\d+\.\s", stripped):
            flush()
            continue
        block.append(stripped)
        if stripped.endswith("::"):
            block[-1] = stripped[:-1]
            flush()
            skip_indent = indent
    flush()
    return paragraphs


def split_of(rel_path: str) -> str:
    bucket = int(hashlib.sha256(rel_path.encode()).hexdigest(), 16) % 20
    return "test" if bucket < 2 else "valid" if bucket == 2 else "train"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args()
    if not args.source.is_dir():
        print(f"error: {args.source} not found; install it with `apt-get install python3.11-doc`", file=sys.stderr)
        return 2
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for path in sorted(args.source.rglob("*.rst.txt")):
        rel = path.relative_to(args.source).as_posix()
        if rel.split("/")[0] in SKIP_DIRS or rel in SKIP_FILES:
            continue
        splits[split_of(rel)].extend(prose_paragraphs(path.read_text(encoding="utf-8")))
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"source": str(args.source), "license": "PSF License Agreement", "splits": {}}
    for name, paras in splits.items():
        data = ("\n\n".join(paras) + "\n").encode("utf-8")
        if name == "train":  # rebuilt on demand, not committed
            (args.out / "train.txt").write_bytes(data)
        else:  # small held-out splits ship with the repo, gzipped (mtime 0: byte-identical rebuilds)
            with gzip.GzipFile(args.out / f"{name}.txt.gz", "wb", mtime=0) as fh:
                fh.write(data)
        manifest["splits"][name] = {
            "paragraphs": len(paras),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        print(f"{name:6s} {len(paras):6d} paragraphs {len(data)/1e6:6.2f} MB")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
