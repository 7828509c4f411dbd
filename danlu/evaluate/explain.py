"""Which tokens pushed a text classifier's decision: integrated gradients, or occlusion where gradients do not reach.

Integrated gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks") through the model's
token embedding, with Captum's LayerIntegratedGradients: the path runs from a baseline where every real token is
the padding token (a zero embedding in models trained by danlu; special tokens such as [CLS] stay) to the text, and
a token's score is its attribution to the predicted label's log-odds, log p / (1 - p), summed over the embedding's
channels. By completeness the scores add up to the log-odds of the text less those of the baseline.

Occlusion (Zeiler & Fergus 2014; for text, Li et al. 2016, "Understanding Neural Networks through Representation
Erasure") serves any model whose embedding gradients cannot be reached (no `embed` table indexed by token
position, integer kernels): each token is removed in turn and its score is the drop in the predicted label's
log-odds. Regression runs are explained on the predicted value instead.

Scores are per token as the run's tokenizer splits the text (a character for Chinese with the character
tokenizer, a word or word piece otherwise) with the token's character span in the original text, from the
tokenizer's offsets; byte-level pieces of one character are joined into one.

>>> explain(load_run("runs/textcnn_zh"), ["质量很好，物流也快"])[0]["tokens"][:2]   # doctest: +SKIP
[{'text': '质', 'start': 0, 'end': 1, 'score': 0.119}, {'text': '量', 'start': 1, 'end': 2, 'score': -0.175}]
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch import nn

from danlu.registry import ConfigError

METHODS = ("auto", "integrated_gradients", "occlusion")
STEPS = 50  # Captum's default number of steps of the integral's Gauss-Legendre rule


def explain(run, texts, method="auto", steps=STEPS, batch_size=64):
    """[{label, score, method, tokens: [{text, start, end, score}]}] per text ({value, ...} for regression).

    `method`: auto (integrated gradients when gradients reach the token embedding and the all-padding baseline
    does not already favour the predicted label, else occlusion), integrated_gradients or occlusion. A token's
    score is positive when it pushed towards the predicted label (a regression run: towards a higher value)."""
    if method not in METHODS:
        raise ConfigError(f"explain method {method!r}: expected one of {', '.join(METHODS)}")
    if run.cfg.task not in ("classification", "regression"):
        raise ConfigError(f"{run.path}: explanations are for classification and regression runs; this is a "
                          f"{run.cfg.task} run")
    run.model.eval()
    return [_explain_text(run, text, method, steps, batch_size) for text in texts]


def _explain_text(run, text, method, steps, batch_size):
    model, pad_id = run.model, run.tokenizer.pad_id
    device = next(model.parameters()).device
    ids, spans = token_spans(run.tokenizer, text)
    ids_t = torch.tensor([ids], device=device)  # (1, T)
    mask = torch.ones_like(ids_t, dtype=torch.bool)  # (1, T)
    with torch.no_grad():
        output = model(ids_t, mask).float()  # (1, C) logits, or (1, 1) for regression
    if run.cfg.task == "regression":
        result, target = {"value": float(output.reshape(-1)[0])}, None
    else:
        probs = output.softmax(-1)[0]  # (C,)
        target = int(probs.argmax())
        result = {"label": run.labels[target], "score": float(probs[target])}
    score = _scorer(model, target)
    if method == "integrated_gradients" and not _have_captum():
        raise ConfigError("integrated gradients need Captum: pip install 'danlu[explain]' (or captum); "
                          "the occlusion method needs nothing more")
    if method == "auto":
        reached = _have_captum() and gradients_reach(model, ids_t, mask)
        use_gradients = reached and (target is None or not _baseline_agrees(score, ids_t, mask, spans, pad_id))
        method = "integrated_gradients" if use_gradients else "occlusion"
    elif method == "integrated_gradients" and not gradients_reach(model, ids_t, mask):
        raise ConfigError(f"{run.path}: integrated gradients need a token embedding that gradients reach "
                          f"(model.kind {run.cfg.model.kind} has none); use the occlusion method")
    real = [i for i, span in enumerate(spans) if span is not None]
    if not real:  # a text of no tokens (the run reads it as one unknown token): nothing to attribute
        values = []
    elif method == "integrated_gradients":
        values = _integrated_gradients(model, score, ids_t, mask, spans, pad_id, steps)
    else:
        values = _occlusion(score, ids, spans, run.tokenizer, device, batch_size)
    result["method"] = method
    result["tokens"] = merge_pieces(text, [(spans[i], values[k]) for k, i in enumerate(real)])
    return result


def token_spans(tokenizer, text):
    """(ids, spans) of `text` as the run encodes it: spans[i] is token i's (start, end) in characters of the
    original text, None for special tokens ([CLS], [SEP]) and for the [UNK] given to a text of no tokens."""
    encoding = tokenizer.tokenizer_.encode(text)
    ids = list(encoding.ids)
    if ids != tokenizer.encode([text])[0].tolist() and ids:  # never: the run's own encoder is this tokenizer
        raise ConfigError("the run's tokenizer encodes this text differently from its offsets; cannot explain it")
    if not ids:  # as danlu.data.encode_examples: a text that normalizes to nothing is one unknown token
        return [tokenizer.token_id("[UNK]")], [None]
    spans = [None if special else tuple(offsets) for special, offsets
             in zip(encoding.special_tokens_mask, encoding.offsets)]
    return ids, spans


def merge_pieces(text, scored):
    """[{text, start, end, score}] from [((start, end), score)] in text order: pieces whose spans overlap (the
    bytes of one character under byte-level BPE) become one, their scores added; spans lose outer whitespace."""
    merged = []
    for (start, end), value in scored:
        if merged and start < merged[-1][1]:
            last = merged[-1]
            merged[-1] = [last[0], max(last[1], end), last[2] + value]
        else:
            merged.append([start, end, value])
    out = []
    for start, end, value in merged:
        piece = text[start:end]
        if piece.strip():  # " good" (BPE keeps the space before a word): the word alone
            start += len(piece) - len(piece.lstrip())
            end -= len(piece) - len(piece.rstrip())
        out.append({"text": text[start:end], "start": start, "end": end, "score": float(value)})
    return out


# ------------------------------------------------------------------------------------------------
# the two methods


def token_embedding(model):
    """The model's token embedding (every danlu text family names it `embed`), or None."""
    embed = getattr(model, "embed", None)
    return embed if isinstance(embed, nn.Embedding) else None


def gradients_reach(model, ids, mask):
    """True when the model has a token embedding indexed like `ids` (B, T) and a backward pass from its output
    reaches that embedding's output (not so through integer kernels, or in a model that hashes n-grams)."""
    embed = token_embedding(model)
    if embed is None:
        return False
    seen = {}

    def hook(module, args, output):
        seen["output"] = output.detach().requires_grad_(True)
        return seen["output"]

    handle = embed.register_forward_hook(hook)
    try:
        with torch.enable_grad(), _rnn_backward():
            output = model(ids, mask)
            if "output" not in seen or tuple(seen["output"].shape[:2]) != tuple(ids.shape) or not output.requires_grad:
                return False
            grad, = torch.autograd.grad(output.float().sum(), seen["output"], allow_unused=True)
    except RuntimeError:  # an operation without a backward (a quantized kernel)
        return False
    finally:
        handle.remove()
    return grad is not None


def _scorer(model, target):
    """f(ids, mask) -> (B,): the log-odds of class `target`, log p / (1 - p), or the predicted value (target None).

    Log-odds, not the probability: a confident model's probability is flat near 1 along most of the path from the
    baseline, so its gradients there say little; the log-odds keep growing (two classes: the logits' difference)."""

    def score(ids, mask):
        output = model(ids, mask).float()  # (B, C) or (B, 1)
        if target is None:
            return output.reshape(-1)  # (B,)
        others = torch.cat([output[:, :target], output[:, target + 1:]], dim=-1)  # (B, C - 1)
        return output[:, target] - others.logsumexp(-1)  # (B,)

    return score


def _baseline(ids, spans, pad_id):
    """(1, T): the text with every real token replaced by padding; special tokens stay."""
    special = torch.tensor([span is None for span in spans], device=ids.device)  # (T,)
    return torch.where(special, ids[0], torch.full_like(ids[0], pad_id)).unsqueeze(0)


@torch.no_grad()
def _baseline_agrees(score, ids, mask, spans, pad_id):
    """True when the all-padding baseline already gives the predicted label even odds or better. Integrated
    gradients explain the move from the baseline to the text (their scores add up to it), so from such a baseline
    they cannot show what pushed towards the label (Sturmfels et al. 2020, "Visualizing the Impact of Feature
    Attribution Baselines"); occlusion, which compares the text with itself less one token, still can."""
    return float(score(_baseline(ids, spans, pad_id), mask)) >= 0.0


def _have_captum():
    """Captum is an extra (danlu[explain]); without it auto explains by occlusion."""
    import importlib.util

    return importlib.util.find_spec("captum") is not None


def _integrated_gradients(model, score, ids, mask, spans, pad_id, steps):
    """Scores of the real tokens (spans not None): Captum's layer integrated gradients on the token embedding."""
    from captum.attr import LayerIntegratedGradients

    baseline = _baseline(ids, spans, pad_id)
    ig = LayerIntegratedGradients(score, token_embedding(model))
    with torch.enable_grad(), _rnn_backward():
        attributions = ig.attribute(ids, baselines=baseline, additional_forward_args=(mask,), n_steps=steps,
                                    internal_batch_size=steps)  # (1, T, E)
    values = attributions.sum(-1)[0].float().cpu()  # (T,)
    return [float(values[i]) for i, span in enumerate(spans) if span is not None]


@torch.no_grad()
def _occlusion(score, ids, spans, tokenizer, device, batch_size):
    """Scores of the real tokens: the drop in `score` when the token is removed from the text."""
    full = float(score(torch.tensor([ids], device=device), torch.ones(1, len(ids), dtype=torch.bool, device=device)))
    real = [i for i, span in enumerate(spans) if span is not None]
    unknown = tokenizer.token_id("[UNK]")  # the last real token is replaced, not removed: no text is empty
    variants = [ids[:i] + ([] if len(real) > 1 else [unknown]) + ids[i + 1:] for i in real]
    values = []
    for start in range(0, len(variants), batch_size):  # the variants of a text have one length
        chunk = torch.tensor(variants[start:start + batch_size], device=device)  # (B, T - 1)
        values += (full - score(chunk, torch.ones_like(chunk, dtype=torch.bool))).float().cpu().tolist()
    return values


@contextlib.contextmanager
def _rnn_backward():
    """cuDNN runs an RNN's backward only in training mode; the explanation needs it in eval mode."""
    with torch.backends.cudnn.flags(enabled=False):
        yield


# ------------------------------------------------------------------------------------------------
# the terminal


def color_wanted(stream=None):
    """Colour for a terminal, never when NO_COLOR is set (https://no-color.org) or the output is a pipe or file."""
    stream = stream or sys.stdout
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


# 256-colour backgrounds from faint to strong: green for towards the predicted label, red for against it
_TOWARDS = (194, 157, 120, 83)
_AGAINST = (224, 217, 210, 203)


def render_terminal(text, explanation, color, top=5):
    """The lines `danlu predict --explain` prints under a prediction: the text with each token coloured by
    its score (colour) or followed by it (plain), and the tokens that pushed hardest."""
    tokens = explanation["tokens"]
    strongest = max((abs(t["score"]) for t in tokens), default=0.0) or 1.0
    pieces, at = [], 0
    for t in tokens:
        pieces.append(text[at:t["start"]])
        piece = text[t["start"]:t["end"]]
        if color:
            level = min(3, int(4 * abs(t["score"]) / strongest))
            shade = (_TOWARDS if t["score"] >= 0 else _AGAINST)[level]
            pieces.append(f"\x1b[48;5;{shade}m\x1b[38;5;16m{piece}\x1b[0m" if abs(t["score"]) >= 0.1 * strongest
                          else piece)
        else:
            pieces.append(f"{piece}[{t['score']:+.3f}]")
        at = t["end"]
    pieces.append(text[at:])
    ranked = sorted(tokens, key=lambda t: -abs(t["score"]))[:top]
    strongest_line = "  ".join(f"{t['text']} {t['score']:+.3f}" for t in ranked)
    return [f"  {''.join(pieces)}", f"  strongest ({explanation['method']}): {strongest_line}"]
