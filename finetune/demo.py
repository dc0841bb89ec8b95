"""The built-in demo domain `builtin:python-docs`: questions about what Python standard-library functions do, answered
from their own docstrings, so every install has a real domain offline.

Each pair reads
    user:      What does `textwrap.dedent` do in Python?
    assistant: `textwrap.dedent` removes any common leading whitespace from every line in text.
The answer is the docstring's first sentence, turned from the imperative ("Remove ...") into a description
("removes ..."), after the function's name. One consistent, short style (< ~50 tokens) is what a 135M model picks up
in minutes, and it keeps generation-based evaluation fast. The signature is left out on purpose: with it, the tuned
model guessed parameter lists and often looped in them ("(s, s, s, ..."); without it, on the held-out 60 after 100
steps of the default recipe, ROUGE-L went 0.23 -> 0.50 and token F1 0.19 -> 0.44 (60 wins of 60 on ROUGE-L).

Deterministic for a given Python version: modules and names are sorted and the held-out functions are drawn with a
fixed seed, disjoint from the training ones. Written once (atomically) to STUDIO_HOME/datasets/python-docs/.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

from finetune.fsutil import write_text_atomic
from finetune.paths import studio_home

VERSION = 3  # bump when the generated text changes: the files are rewritten
SEED = 1234
HELDOUT = 60
MAX_TRAIN = 400
MAX_WORDS = 30  # answers stay under ~50 tokens
QUESTION = "What does `{name}` do in Python?"

# Modules whose public functions are documented well enough to learn from, and the methods of a few types. os and
# socket are left out: their functions differ between operating systems (os.path does not).
MODULES = (
    "ast", "base64", "binascii", "bisect", "builtins", "calendar", "cmath", "codecs", "collections", "colorsys",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "email.utils", "filecmp", "fnmatch",
    "fractions", "functools", "getpass", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "inspect",
    "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "math", "mimetypes",
    "operator", "os.path", "pathlib", "pickle", "platform", "pprint", "quopri", "random", "re", "secrets", "shlex",
    "shutil", "statistics", "string", "struct", "subprocess", "sys", "sysconfig", "tarfile", "tempfile", "textwrap",
    "threading", "time", "tokenize", "traceback", "types", "typing", "unicodedata", "urllib.parse", "uuid",
    "warnings", "webbrowser", "zipfile", "zlib",
)
TYPES = ("str", "bytes", "list", "dict", "set", "int", "float", "collections.Counter", "collections.OrderedDict",
         "collections.deque", "pathlib.Path", "pathlib.PurePath", "datetime.datetime", "datetime.date",
         "datetime.timedelta", "fractions.Fraction", "decimal.Decimal", "logging.Logger", "string.Template",
         "difflib.SequenceMatcher", "zipfile.ZipFile", "textwrap.TextWrapper", "io.StringIO")
# Only sentences that start with one of these imperatives are kept ("Return ..." -> "`f(x)` returns ..."): one answer
# shape throughout is what makes the style learnable in a few hundred steps.
VERBS = set("""
    abort add append apply arrange ask build calculate call cast change check clear close collapse combine compare
    compile compose compress compute concatenate connect construct convert copy count create decode decompress delete
    deserialize determine discard divide dump duplicate enable encode ensure escape estimate evaluate execute exit
    expand extend extract fill filter find flush force format generate get guess handle hash indent initialize insert
    invoke iterate join load locate log look make map mark match merge move normalize obtain open pack pad parse
    partition perform pop prepare print push put query quote read register remove rename replace represent reset
    resolve retrieve return reverse round run save scan search send serialize set shift shuffle skip sort split start
    strip substitute swap take tell test tokenize transform translate truncate try unpack unquote unregister
    update use validate verify wait walk wrap write yield
""".split())
def _verb_3s(word: str) -> str:
    """Imperative -> third person singular: Return -> returns, Apply -> applies, Do -> does."""
    w = word.lower()
    if w in ("do", "go"):
        return w + "es"
    if w == "be":
        return "is"
    if w == "have":
        return "has"
    if re.search(r"[^aeiou]y$", w):
        return w[:-1] + "ies"
    if re.search(r"(s|sh|ch|x|z)$", w):
        return w + "es"
    return w + "s"


def _clean(text: str) -> str:
    """reST and doctest markup out, whitespace collapsed."""
    text = re.sub(r":(?:func|meth|class|attr|mod|data|exc|const|obj|term|ref|pep):`~?([^`<]+?)(?:\s*<[^>]*>)?`", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\1", text)
    text = text.replace("*", "")
    return re.sub(r"\s+", " ", text).strip()


_ABBREV = ("e.g", "i.e", "etc", "vs", "cf", "resp", "approx", "Ex", "No")


def first_sentence(doc: str, name: str) -> str | None:
    """The docstring's first sentence, without a leading signature line; None when there is no usable one."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)) if p.strip()]
    short = name.rsplit(".", 1)[-1]
    # C functions start with their signature ("sqrt(x)\n\nReturn ..." or "sqrt(x) -> float"): skip it.
    while paras and re.match(rf"^[\w.]*{re.escape(short)}\s*\(.*\)(\s*->.*)?$", paras[0].split("\n")[0]) \
            and len(paras[0].split("\n")) == 1:
        paras = paras[1:]
    if not paras:
        return None
    para = paras[0]
    if re.match(rf"^[\w.]*{re.escape(short)}\s*\(.*\)(\s*->.*)?$", para.split("\n")[0]):
        para = "\n".join(para.split("\n")[1:])
    para = _clean(para)
    for m in re.finditer(r"[.!?](?=\s|$)", para):
        before = para[: m.start()]
        if any(before.endswith(a) for a in _ABBREV) or re.search(r"(^|\s)[A-Z]$", before):  # "e.g.", "J. Smith"
            continue
        return para[: m.end()].strip()
    return para if para.endswith((".", "!", "?")) else para + "." if para and para[-1].isalnum() else None


def _has_signature(obj) -> bool:
    """Functions without an introspectable signature are mostly C helpers whose docstrings read oddly."""
    try:
        inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    return True


def _describe(sentence: str) -> str | None:
    """'Return x and set y.' -> 'returns x and sets y.'; None unless the sentence starts with a known imperative
    (optionally after an adverb: 'Recursively delete ...')."""
    words = sentence.split(" ")
    adverb = []
    if len(words) > 1 and words[0].lower().endswith("ly") and words[1].lower() in VERBS:
        adverb, words = [words[0].lower()], words[1:]
    verb = words[0].lower()
    if verb in VERBS:
        head = _verb_3s(verb)
    elif verb in {_verb_3s(v) for v in VERBS}:  # the docstring already says "Returns ..."
        head = verb
    else:
        return None
    rest = " ".join(words[1:])
    # coordinated imperatives: "create and return", "open the file, read it, and close it", "compare ...; generate"
    rest = re.sub(r"(\b(?:and|or|then) |, (?:and |or |then )?|; )([a-z]+)\b",
                  lambda m: m.group(1) + (_verb_3s(m.group(2)) if m.group(2) in VERBS else m.group(2)), rest)
    return " ".join([*adverb, head, rest])


def answer(name: str, obj) -> str | None:
    """The answer for one function, or None when its docstring has no short imperative first sentence."""
    doc = inspect.getdoc(obj)
    if not doc or not isinstance(doc, str):
        return None
    sentence = first_sentence(doc, name)
    if not sentence or not _has_signature(obj) or not 3 <= len(sentence.split()) <= MAX_WORDS:
        return None
    if re.search(r"[<>{}\[\]|]|\b0x[0-9a-f]", sentence) or "deprecated" in sentence.lower():
        return None  # markup remnants or deprecation notes: not a self-contained answer
    described = _describe(sentence)
    return f"`{name}` {described}" if described else None


def _public_functions(module_name: str):
    """(qualified name, object) for a module's public functions, or a type's public methods."""
    if module_name in TYPES:
        mod, _, tname = module_name.rpartition(".")
        owner = getattr(importlib.import_module(mod), tname) if mod else getattr(importlib.import_module("builtins"), tname)
        prefix = module_name
        members = [(k, v) for k, v in vars(owner).items()]
        keep = lambda v: callable(v) or isinstance(v, (classmethod, staticmethod))  # noqa: E731
    else:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            return []
        prefix = "" if module_name == "builtins" else module_name
        members = list(vars(owner).items())
        public = getattr(owner, "__all__", None)
        # bound methods too: random.choice is a method of the module's hidden Random instance
        keep = lambda v: inspect.isfunction(v) or inspect.isbuiltin(v) or inspect.ismethod(v)  # noqa: E731
        if public is not None:
            members = [(k, v) for k, v in members if k in public]
    out = []
    for k, v in sorted(members, key=lambda kv: kv[0]):
        if k.startswith("_") or k.isupper() or not keep(v):
            continue
        if isinstance(v, (classmethod, staticmethod)):
            v = v.__func__
        out.append((f"{prefix}.{k}" if prefix else k, v))
    return out


def build_pairs() -> list[dict]:
    """Every usable (name, answer) pair, sorted by name, one per function object."""
    seen, pairs = set(), {}
    for module_name in sorted(set(MODULES) | set(TYPES)):
        for name, obj in _public_functions(module_name):
            key = id(getattr(obj, "__func__", obj))
            if key in seen or name in pairs:
                continue
            text = answer(name, obj)
            if text:
                seen.add(key)
                pairs[name] = text
    return [{"name": n, "answer": pairs[n]} for n in sorted(pairs)]


def to_row(pair: dict) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION.format(name=pair["name"])},
                         {"role": "assistant", "content": pair["answer"]}]}


def build() -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): a seeded draw of HELDOUT functions is held out; the train rows are up to
    MAX_TRAIN of the rest. Both are sorted by function name."""
    pairs = build_pairs()
    order = list(range(len(pairs)))
    random.Random(SEED).shuffle(order)
    held = sorted(order[:HELDOUT])
    train = sorted(order[HELDOUT:HELDOUT + MAX_TRAIN])
    return [to_row(pairs[i]) for i in train], [to_row(pairs[i]) for i in held]


def demo_dir() -> Path:
    return studio_home() / "datasets" / "python-docs"


def _stamp() -> dict:
    return {"version": VERSION, "python": sys.version.split()[0], "seed": SEED}


def ensure_demo() -> tuple[Path, Path]:
    """(train.jsonl, heldout.jsonl) of the demo, generated on first use (or when the generator or Python changed)."""
    folder = demo_dir()
    train_path, held_path, meta_path = folder / "train.jsonl", folder / "heldout.jsonl", folder / "meta.json"
    try:
        current = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = None
    if current and {k: current.get(k) for k in _stamp()} == _stamp() and train_path.is_file() and held_path.is_file():
        return train_path, held_path
    folder.mkdir(parents=True, exist_ok=True)
    train, held = build()
    texts = {p: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
             for p, rows in ((train_path, train), (held_path, held))}
    for p, text in texts.items():
        write_text_atomic(p, text)
    meta = {**_stamp(), "train_rows": len(train), "heldout_rows": len(held),
            "sha256": hashlib.sha256("".join(texts.values()).encode()).hexdigest()}
    write_text_atomic(meta_path, json.dumps(meta, indent=1) + "\n")  # last: its presence says both files are complete
    return train_path, held_path


if __name__ == "__main__":  # python -m finetune.demo: write the files and print a few pairs
    t, h = ensure_demo()
    print(t, h)
    for line in h.read_text(encoding="utf-8").splitlines()[:10]:
        print(json.loads(line)["messages"][1]["content"])
