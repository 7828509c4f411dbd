"""Generated-text metrics, streamed over an evaluation set: BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score),
exact match; and the examples a report shows (the first ones, the best and the worst by sentence BLEU).

BLEU (Papineni et al. 2002) and chrF (Popović 2015) are corpus scores: each batch adds its sentences'
sufficient statistics (n-gram matches and totals), computed by sacrebleu itself, and the score comes from
their sums at the end, exactly sacrebleu's `corpus_score` on the whole set without holding it
(tests/test_seq2seq.py checks the two agree). BLEU tokenizes with sacrebleu's `13a`, or `zh` when the
references hold CJK characters (decided on the first batch; `tokenize=` chooses).

ROUGE (Lin 2004) is the mean over examples of rouge-score's F-measure. rouge-score's own tokenizer keeps
only [a-z0-9], which deletes Chinese (and German umlauts): danlu's `RougeTokenizer` lowercases and makes
each CJK character one token and each run of other letters or digits (any script) one token, with no
stemming, so that the same scorer serves English, German and Chinese.

>>> m = TextMetrics(); m.update(["the cat sat"], ["the cat sat down"]); m.compute()["bleu"]  # doctest: +SKIP
"""
from __future__ import annotations

import heapq
import re

KEEP = 5  # examples of each kind the report shows

_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f"  # CJK scripts, Hangul, compatibility
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
_HAS_CJK = re.compile(f"[{_CJK}]")


class RougeTokenizer:
    """rouge-score tokenizer: lowercase; a CJK character is a token, so is each run of other word characters."""

    def tokenize(self, text):
        return _TOKEN.findall(text.lower())


def normalize(text):
    """Whitespace collapsed, ends stripped: what exact match compares."""
    return " ".join(text.split())


class TextMetrics:
    """Streaming text-generation metrics: `update(hypotheses, references, sources)` per batch, `compute()`."""

    def __init__(self, tokenize="auto", keep=KEEP):
        self.tokenize, self.keep = tokenize, keep
        self.bleu_stats = self.chrf_stats = None
        self.rouge_sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        self.count, self.exact = 0, 0
        self.first, self.best, self.worst = [], [], []  # heaps of (score, order, example)
        self._bleu = self._chrf = self._sentence_bleu = self._rouge = None

    def _setup(self, references):
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import BLEU, CHRF

        if self.tokenize == "auto":
            self.tokenize = "zh" if any(_HAS_CJK.search(r) for r in references) else "13a"
        self._bleu = BLEU(tokenize=self.tokenize)
        self._sentence_bleu = BLEU(tokenize=self.tokenize, effective_order=True)
        self._chrf = CHRF()
        self._rouge = rouge_scorer.RougeScorer(list(self.rouge_sums), use_stemmer=False, tokenizer=RougeTokenizer())

    def update(self, hypotheses, references, sources=None):
        hypotheses, references = list(hypotheses), list(references)
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
        if not hypotheses:
            return
        if self._bleu is None:
            self._setup(references)
        # sacrebleu's per-sentence sufficient statistics; summed, they give its corpus score (see the module doc)
        bleu = self._bleu._extract_corpus_statistics(hypotheses, [references])
        chrf = self._chrf._extract_corpus_statistics(hypotheses, [references])
        self.bleu_stats = _add(self.bleu_stats, bleu)
        self.chrf_stats = _add(self.chrf_stats, chrf)
        sources = list(sources) if sources is not None else [""] * len(hypotheses)
        for hyp, ref, src in zip(hypotheses, references, sources):
            scores = self._rouge.score(ref, hyp)
            for key in self.rouge_sums:
                self.rouge_sums[key] += scores[key].fmeasure
            self.exact += normalize(hyp) == normalize(ref)
            sentence = self._sentence_bleu.sentence_score(hyp, [ref]).score
            example = {"source": src, "reference": ref, "hypothesis": hyp, "bleu": sentence,
                       "rougeL": scores["rougeL"].fmeasure}
            order = self.count
            self.count += 1
            if len(self.first) < self.keep:
                self.first.append(example)
            _push(self.best, (sentence, -order, example), self.keep)
            _push(self.worst, (-sentence, -order, example), self.keep)

    def compute(self):
        """{bleu, chrf, rouge1, rouge2, rougeL, exact_match, count, bleu_signature}; scores are percentages (0-100)
        as sacrebleu reports them, ROUGE and exact match too."""
        if not self.count:
            return {"bleu": 0.0, "chrf": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "exact_match": 0.0, "count": 0}
        out = {"bleu": float(self._bleu._compute_score_from_stats(self.bleu_stats).score),
               "chrf": float(self._chrf._compute_score_from_stats(self.chrf_stats).score)}
        out.update({k: 100.0 * v / self.count for k, v in self.rouge_sums.items()})
        out.update(exact_match=100.0 * self.exact / self.count, count=self.count,
                   bleu_signature=str(self._bleu.get_signature()))
        return out

    def examples(self):
        """{first, best, worst}: lists of {source, reference, hypothesis, bleu, rougeL}."""
        return {"first": list(self.first), "best": [e for _, _, e in sorted(self.best, key=lambda t: (-t[0], -t[1]))],
                "worst": [e for _, _, e in sorted(self.worst, key=lambda t: (-t[0], -t[1]))]}


def score_texts(hypotheses, references, sources=None, tokenize="auto"):
    """All metrics of a whole list at once (one update)."""
    metrics = TextMetrics(tokenize)
    metrics.update(hypotheses, references, sources)
    return metrics.compute()


_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "gov", "rep", "sen", "inc", "co", "corp",
                  "ltd", "no", "vs", "u.s", "u.k", "e.g", "i.e", "jan", "feb", "aug", "sept", "oct", "nov", "dec"}
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9])|[。！？]")


def lead_sentence(text):
    """The first sentence of a text, the lead baseline of summarization (See et al. 2017 use the first
    three): up to a . ! ? followed by a space and a capital or digit (not after a common abbreviation
    such as "Dr."), or up to 。！？; the whole text when there is no such end."""
    text = text.strip()
    for match in _SENTENCE_END.finditer(text):
        words = text[: match.start()].split()
        if match.group(0)[0] == "." and words and words[-1].lower().rstrip(".") in _ABBREVIATIONS:
            continue
        return text[: match.end()].strip()
    return text


def _add(total, stats):
    import numpy as np

    batch = np.asarray(stats, dtype=np.float64).sum(0)
    return batch if total is None else total + batch


def _push(heap, item, keep):
    if not keep:
        return
    if len(heap) < keep:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)
