"""Training text and tokenizers, with no download: the default corpus is the docstrings of Python's standard library,
gathered at run time; any text files can be given instead. Tokenizers: bytes (the default) or a BPE trained on the
corpus with the ``tokenizers`` package (optional).

Special ids (shared with fastlm.models.bert): 0 [PAD], 1 [CLS], 2 [SEP], 3 [MASK]; bytes are ids 4..259.
"""

import functools
import importlib
import pkgutil
import warnings

import torch

N_SPECIAL = 4
STDLIB_MODULES = (
    "collections",
    "functools",
    "itertools",
    "json",
    "re",
    "string",
    "textwrap",
    "typing",
    "pathlib",
    "argparse",
    "datetime",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "heapq",
    "bisect",
    "difflib",
    "shutil",
    "tempfile",
    "logging",
    "unittest",
    "inspect",
    "dataclasses",
    "enum",
    "csv",
    "email",
    "http",
    "urllib",
    "xml",
    "html",
    "sqlite3",
    "zipfile",
    "tarfile",
    "gzip",
    "pickle",
)


@functools.cache
def stdlib_corpus(max_chars: int = 4_000_000) -> str:
    """The docstrings of (a fixed list of) standard-library modules and their public members, in a fixed order."""
    parts, total = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            mods = [mod]
            if hasattr(mod, "__path__"):
                for info in sorted(pkgutil.iter_modules(mod.__path__), key=lambda i: i.name):
                    if info.name.startswith("_"):
                        continue
                    try:
                        mods.append(importlib.import_module(f"{name}.{info.name}"))
                    except Exception:  # optional submodules (e.g. needing a missing C library)
                        continue
            for m in mods:
                # the module and what it defines itself: independent of what else happens to be imported
                own = [getattr(m, a) for a in sorted(vars(m)) if not a.startswith("_")]
                own = [o for o in own if getattr(o, "__module__", None) == m.__name__]
                for obj in [m, *own]:
                    doc = getattr(obj, "__doc__", None)
                    if isinstance(doc, str) and len(doc) > 40:
                        parts.append(doc.strip())
                        total += len(doc)
                if total > max_chars:
                    break
    text = "\n\n".join(dict.fromkeys(parts))  # de-duplicated, order kept
    return text[:max_chars]


class ByteTokenizer:
    vocab_size = 256 + N_SPECIAL

    def encode(self, text: str) -> list[int]:
        return [b + N_SPECIAL for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - N_SPECIAL for i in ids if i >= N_SPECIAL).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE trained on the corpus (needs the ``tokenizers`` package)."""

    def __init__(self, text: str, vocab_size: int = 2048):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["[PAD]", "[CLS]", "[SEP]", "[MASK]"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(text.split("\n\n"), trainer)
        self.tok, self.vocab_size = tok, tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def load_text(paths: list[str] | None) -> str:
    if not paths:
        return stdlib_corpus()
    out = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    return "\n\n".join(out)


def split_tokens(ids: list[int], val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.tensor(ids, dtype=torch.long)
    n_val = max(1, int(len(data) * val_fraction))
    return data[:-n_val], data[-n_val:]


def batch(data: torch.Tensor, batch_size: int, seq: int, seed: int, step: int, rank: int = 0, world: int = 1):
    """The batch of ``step`` on ``rank``: (B, seq + 1) windows at offsets drawn from a generator seeded by
    (seed, step), so a resumed run sees exactly the batches it would have seen, and ranks see disjoint rows."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq - 1, (batch_size * world,), generator=g)[rank * batch_size :][:batch_size]
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
