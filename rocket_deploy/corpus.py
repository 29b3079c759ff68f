"""Calibration and evaluation text: user files, or text that is installed anyway on any machine.

Sources (each yields :class:`Document` objects):

* ``stdlib`` -- docstrings of the Python standard library (modules, classes, functions);
* ``pyref`` -- the Python reference manual's help topics (``pydoc_data.topics``), English technical prose;
* ``licenses`` -- license texts installed with the Python packages here (``*.dist-info``) and, on Debian,
  ``/usr/share/common-licenses``;
* ``pkgdocs`` -- the installed Python packages' READMEs (``*.dist-info/METADATA``);
* system text of a Debian-like machine, never calibrated on by default (evaluation registers, see
  ``NEVER_CALIBRATED``): ``manpages`` (man pages as plain text), ``copyright`` (``/usr/share/doc/*/copyright``
  without the paragraphs the ``licenses`` source holds), ``faq`` (installed FAQs: question and answer),
  ``vimguide`` (Vim's user manual: tutorial prose); a source missing on a machine yields no documents;
* ``selfgen`` -- text sampled from the model itself (built by the pipeline, :mod:`rocket_deploy.selfgen`);
* a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file with a ``text`` field.

Documents, not tokens, are split between calibration and held-out evaluation, so the two never share text.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import gzip
import hashlib
import html
import importlib
import inspect
import io
import json
import os
import random
import re
import sys
import warnings
from typing import Iterable, Sequence

import torch

BUILTIN_SOURCES = ("stdlib", "pyref", "licenses", "pkgdocs", "selfgen", "manpages", "copyright", "faq", "vimguide")
_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "__hello__",
                 "__phello__", "lib2to3", "ensurepip", "venv", "pydoc", "webbrowser", "xxsubtype", "msvcrt",
                 "winreg", "winsound", "_winapi", "nt", "tty", "pty", "curses", "readline", "sqlite3.test"}


class CorpusError(ValueError):
    """Bad or empty calibration / evaluation text."""


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    domain: str
    source: str


def _clean(text: str | None, min_chars: int) -> str | None:
    if not text:
        return None
    text = inspect.cleandoc(text).strip()
    return text if len(text) >= min_chars else None


@functools.lru_cache(maxsize=2)
def _stdlib_docs() -> tuple[Document, ...]:
    names = sorted(n for n in getattr(sys, "stdlib_module_names", ()) if not n.startswith("_") and n not in _SKIP_MODULES)
    docs, seen = [], set()
    sink = io.StringIO()
    for name in names:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            try:
                mod = importlib.import_module(name)
            except BaseException:  # noqa: BLE001 -- platform modules that do not import here are skipped
                continue
        items = [(name, mod)]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr, None)
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                items.append((f"{name}.{attr}", obj))
                if inspect.isclass(obj):
                    for meth in sorted(vars(obj)):
                        fn = vars(obj)[meth]
                        if not meth.startswith("_") and inspect.isfunction(fn):
                            items.append((f"{name}.{attr}.{meth}", fn))
        for qual, obj in items:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                text = _clean(obj.__doc__ if not inspect.ismodule(obj) else mod.__doc__, 200)
            if text and text not in seen:
                seen.add(text)
                docs.append(Document(text, "stdlib", qual))
    return tuple(docs)


def stdlib_docstrings(max_docs: int | None = None) -> list[Document]:
    docs = list(_stdlib_docs())
    return docs[:max_docs] if max_docs else docs


def python_reference_topics() -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    out = []
    for key in sorted(topics):
        # Topics are long; paragraphs-groups of ~2k chars make documents of a size similar to docstrings.
        paras = [p.strip() for p in topics[key].split("\n\n") if p.strip()]
        buf: list[str] = []
        for p in paras:
            buf.append(p)
            if sum(map(len, buf)) > 2000:
                out.append(Document("\n\n".join(buf), "pyref", key))
                buf = []
        if buf and sum(map(len, buf)) > 200:
            out.append(Document("\n\n".join(buf), "pyref", key))
    return out


def installed_licenses() -> list[Document]:
    paths: set[str] = set()
    for site in sys.path:
        if os.path.isdir(site):
            for pat in ("*.dist-info/LICENSE*", "*.dist-info/licenses/**/*", "*.dist-info/COPYING*"):
                paths.update(glob.glob(os.path.join(site, pat), recursive=True))
    paths.update(glob.glob("/usr/share/common-licenses/*"))
    docs, seen = [], set()
    for p in sorted(paths):
        if not os.path.isfile(p) or os.path.getsize(p) > 200_000:
            continue
        try:
            with open(p, encoding="utf-8") as f:
                text = _clean(f.read(), 300)
        except (UnicodeDecodeError, OSError):
            continue
        if text and text not in seen:
            seen.add(text)
            docs.append(Document(text, "licenses", p))
    return docs


def package_docs() -> list[Document]:
    """Long descriptions (READMEs) of the installed Python packages, from their ``*.dist-info/METADATA``."""
    docs, seen = [], set()
    for site in sys.path:
        for meta in sorted(glob.glob(os.path.join(site, "*.dist-info", "METADATA"))) if os.path.isdir(site) else []:
            try:
                with open(meta, encoding="utf-8") as f:
                    raw = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            body = raw.split("\n\n", 1)[1] if "\n\n" in raw else ""
            for i, part in enumerate(p for p in body.split("\n\n\n") if p.strip()):
                text = _clean(part, 400)
                if text and text not in seen:
                    seen.add(text)
                    docs.append(Document(text[:20000], "pkgdocs", f"{meta}#{i}"))
    return docs


# ------------------------------------------------------------------ system text (never calibrated by default)
_ROFF_ESC = re.compile(r"\\(f(\[[^\]]*\]|\(..|.)|s[+-]?\d+|\*(\(..|\[[^\]]*\]|.)|\(..|\[[^\]]*\]|[&|^/,%:)]|n(\(..|.))")
_ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB", "IP", "TP", "Nm", "Nd",
                     "Sh", "Ss", "Fl", "Ar", "Op", "It", "Pa", "Xr", "Dv", "Cm", "Ev", "Em", "Sy", "Li", "Ql"}


def _read_maybe_gz(path: str, limit: int = 400_000) -> str | None:
    try:
        if os.path.getsize(path) > limit:
            return None
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def roff_to_text(src: str) -> str:
    """Plain text of a man page: macro lines keep their arguments only when they carry text (headings, fonts),
    definitions / conditionals / comments are dropped, escapes are removed or mapped to ASCII."""
    out, skip = [], False
    for line in src.splitlines():
        if skip:
            skip = not line.startswith("..")
            continue
        if line.startswith((".\\\"", "'\\\"", ".\\\\\"")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            if name in ("de", "de1", "am", "ig"):
                skip = True
                continue
            if name not in _ROFF_TEXT_MACROS or not rest.strip():
                if name in ("PP", "LP", "P", "SH", "SS", "Pp", "Sh"):
                    out.append("")                       # a paragraph break
                continue
            line = rest.replace('"', "")
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\(aq", "'")
        line = line.replace("\\(em", "--").replace("\\(en", "-").replace("\\(lq", '"').replace("\\(rq", '"')
        out.append(_ROFF_ESC.sub("", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _paragraph_docs(text: str, domain: str, source: str, size: int = 2000, min_chars: int = 300) -> list[Document]:
    """Cut a long text into documents of whole paragraphs, about ``size`` characters each."""
    out, buf = [], []
    for p in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if p:
            buf.append(p)
        if sum(map(len, buf)) > size:
            out.append(Document("\n\n".join(buf), domain, f"{source}#{len(out)}"))
            buf = []
    if buf and sum(map(len, buf)) >= min_chars:
        out.append(Document("\n\n".join(buf), domain, f"{source}#{len(out)}"))
    return out


@functools.lru_cache(maxsize=1)
def manual_pages(max_pages: int = 600) -> tuple[Document, ...]:
    """English man pages (``/usr/share/man/man{1,5,7,8}``) as plain text: a seeded sample of ``max_pages``
    pages, one document per ~2000 characters of each page (technical reference register)."""
    by_cmd: dict[str, str] = {}       # one page per command family (gcloud ships thousands of sub-command pages)
    for p in sorted(glob.glob("/usr/share/man/man[1578]/*")):
        by_cmd.setdefault(re.split(r"[._-]", os.path.basename(p), maxsplit=1)[0], p)
    paths = sorted(by_cmd.values())
    random.Random(0).shuffle(paths)
    docs: list[Document] = []
    for p in paths[:max_pages]:
        raw = _read_maybe_gz(p, 200_000)
        if raw and not raw.startswith(".so "):
            docs.extend(_paragraph_docs(roff_to_text(raw), "manpages", p))
    return _shuffled(docs)


def _shuffled(docs: list[Document]) -> tuple[Document, ...]:
    """A fixed (seeded) order: chunk_tokens reads documents in order, so evaluation sets mix many files."""
    docs = list(docs)
    random.Random(0).shuffle(docs)
    return tuple(docs)


def _norm(par: str) -> str:
    return " ".join(w for w in par.split() if w != ".")


@functools.lru_cache(maxsize=1)
def debian_copyright() -> tuple[Document, ...]:
    """Debian packages' copyright files (``/usr/share/doc/*/copyright``: holders, terms, notices; legal register)
    with every paragraph that also occurs in a text of the ``licenses`` source removed, so the held-out legal
    text is not calibration text in disguise."""
    known = {_norm(p) for d in installed_licenses() for p in re.split(r"\n\s*\n", d.text)}
    docs, seen = [], set()
    for p in sorted(glob.glob("/usr/share/doc/*/copyright")):
        raw = _read_maybe_gz(p, 200_000)
        if not raw:
            continue
        pars = [q for q in re.split(r"\n\s*\n", raw) if q.strip() and _norm(q) not in known]
        text = _clean("\n\n".join(pars), 300)
        if text and text not in seen:
            seen.add(text)
            docs.extend(_paragraph_docs(text, "copyright", p))
    return _shuffled(docs)


@functools.lru_cache(maxsize=1)
def faq_documents() -> tuple[Document, ...]:
    """Installed FAQs (``/usr/share/doc/**/*faq*``, Perl's ``*FAQ.pod``, ``faq`` man pages): question-and-answer
    register, the closest to dialogue that a stock system ships."""
    paths = set(glob.glob("/usr/share/doc/**/*[Ff][Aa][Qq]*", recursive=True))
    paths |= set(glob.glob("/usr/share/perl*/**/*FAQ*.pod", recursive=True))
    paths |= set(glob.glob("/usr/share/man/man[1578]/*faq*"))
    docs, seen = [], set()
    for p in sorted(paths):
        if not os.path.isfile(p) or p.endswith((".png", ".gif", ".css", ".js")):
            continue
        raw = _read_maybe_gz(p)
        if not raw:
            continue
        if "/man/" in p:
            raw = roff_to_text(raw)
        elif ".htm" in p:
            raw = re.sub(r"<[^>]+>", "", re.sub(r"(?is)<(script|style).*?</\1>", "", raw))
            raw = html.unescape(raw)
        elif p.endswith(".pod"):
            raw = re.sub(r"[A-Z]<+([^<>]*)>+", r"\1", re.sub(r"(?m)^=(cut|pod|begin|end|over|back)\b.*$", "", raw))
            raw = re.sub(r"(?m)^=(head\d|item)\s*", "", raw)
        key = raw[:2000]
        if key not in seen:
            seen.add(key)
            docs.extend(_paragraph_docs(raw, "faq", p))
    return _shuffled(docs)


@functools.lru_cache(maxsize=1)
def vim_user_manual() -> tuple[Document, ...]:
    """Vim's user manual (``/usr/share/vim/vim*/doc/usr_*.txt``): tutorial prose addressed to a reader, one
    document per ~2000 characters (help-file tags and separator lines removed)."""
    docs = []
    for p in sorted(glob.glob("/usr/share/vim/vim*/doc/usr_*.txt")):
        raw = _read_maybe_gz(p)
        if not raw:
            continue
        raw = re.sub(r"(?m)^[=*-]{10,}\s*$", "", raw)
        raw = re.sub(r"\*[\w.:-]+\*", "", raw).replace("|", "")
        docs.extend(_paragraph_docs(raw, "vimguide", p))
    return _shuffled(docs)


SYSTEM_SOURCES = {"manpages": manual_pages, "copyright": debian_copyright, "faq": faq_documents,
                  "vimguide": vim_user_manual}
# Registers of the evaluation domains that no default calibration source covers (docs/benchmarks.md section 6).
NEVER_CALIBRATED = {"pkgdocs": "technical READMEs", "manpages": "technical reference", "copyright": "legal",
                    "faq": "question and answer", "vimguide": "tutorial prose"}


def read_text_file(path: str) -> list[Document]:
    """A ``.txt`` file (blank-line separated documents) or ``.jsonl`` with a ``text`` field per line."""
    if os.path.isdir(path):
        raise CorpusError(f"calibration source {path!r} is a directory; pass a .txt or .jsonl file (repeat --calib "
                          f"for several files)")
    if not os.path.isfile(path):
        raise CorpusError(f"calibration file {path!r} does not exist; pass a .txt or .jsonl file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read {path!r} as UTF-8 text ({e}); pass a UTF-8 .txt or .jsonl file") from e
    docs = []
    if path.endswith((".jsonl", ".json")):
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be an object with a 'text' field") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CorpusError(f"{path}:{i}: each line must be a JSON object with a string 'text' field")
            if rec["text"].strip():
                docs.append(Document(rec["text"].strip(), "user", f"{path}:{i}"))
    else:
        for i, block in enumerate(raw.split("\n\n")):
            if block.strip():
                docs.append(Document(block.strip(), "user", f"{path}#{i}"))
    if not docs:
        raise CorpusError(f"{path!r} contains no text; calibration needs at least one non-empty document")
    return docs


def load_source(source: str) -> list[Document]:
    if source == "stdlib":
        return stdlib_docstrings()
    if source == "pyref":
        return python_reference_topics()
    if source == "licenses":
        return installed_licenses()
    if source == "pkgdocs":
        return package_docs()
    if source in SYSTEM_SOURCES:
        return list(SYSTEM_SOURCES[source]())
    if source == "selfgen":
        raise CorpusError("the 'selfgen' source is sampled from the model; it is built by the compression pipeline")
    return read_text_file(source)


@dataclasses.dataclass(frozen=True)
class TokenSplit:
    """Token chunks of one split: ``ids`` is ``[n, seq_len]`` int64."""
    ids: torch.Tensor
    domain: str
    n_documents: int

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())


def split_documents(docs: Sequence[Document], heldout_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Shuffle (seeded) and cut the documents into disjoint (calibration, held-out) lists.

    Exact duplicate texts are dropped first, so no held-out text can also appear in calibration."""
    if not 0 < heldout_fraction < 1:
        raise ValueError("heldout_fraction must be in (0, 1)")
    seen: set[str] = set()
    docs = [d for d in docs if not (d.text in seen or seen.add(d.text))]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(round(len(docs) * heldout_fraction))) if len(docs) > 1 else 0
    held = [docs[i] for i in order[:n_held]]
    calib = [docs[i] for i in order[n_held:]]
    return calib, held


def chunk_tokens(tokenizer, docs: Iterable[Document], seq_len: int, n_samples: int, domain: str = "mixed") -> TokenSplit:
    """Concatenate documents (separated by EOS) and cut ``n_samples`` chunks of ``seq_len`` tokens."""
    if seq_len < 2:
        raise CorpusError("seq_len must be at least 2")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    need = seq_len * n_samples
    buf: list[int] = []
    n_docs = 0
    for d in docs:
        ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        buf.extend(ids)
        if sep is not None:
            buf.append(int(sep))
        n_docs += 1
        if len(buf) >= need:
            break
    n = min(n_samples, len(buf) // seq_len)
    if n == 0:
        raise CorpusError(f"the text gives {len(buf)} tokens, fewer than one sample of --seq-len {seq_len}; "
                          "add text or lower --seq-len")
    ids = torch.tensor(buf[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return TokenSplit(ids, domain, n_docs)


def fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
