"""Tiny runs built in seconds, for the test suite and the benchmarks (not used by danlu itself).

`classifier_run(dir)` trains a small two-class classifier through the ordinary pipeline;
`language_model_run(dir)` fits a character tokenizer and a tiny GPT (a few hundred steps on a
repetitive corpus, so that greedy decoding says something other than noise) and saves it as a
causal_lm run that `load_run` reads like any other.

>>> run = classifier_run("/tmp/tiny-cls", kind="mlp")       # doctest: +SKIP
"""
from __future__ import annotations

import csv
import os
import random

POSITIVE = ["很好", "喜欢", "满意", "推荐", "不错", "值得", "完美", "good", "great"]
NEGATIVE = ["很差", "失望", "退货", "糟糕", "后悔", "坏了", "bad", "awful", "慢"]
FILLER = ["质量", "物流", "价格", "包装", "客服", "这个", "东西", "房间"]

CORPUS = [
    "你好，我是丹炉，一个小小的语言模型。",
    "今天天气很好，我们去公园散步吧。",
    "丹炉可以训练模型，也可以部署模型。",
    "hello, i am a tiny model. nice to meet you.",
    "the quick brown fox jumps over the lazy dog.",
]


def reviews(n, seed=0, positive=POSITIVE, negative=NEGATIVE, filler=FILLER, max_filler=5):
    """(text, label) rows of synthetic two-class reviews: 1 to `max_filler` neutral words and two of the label's."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "正面" if i % 2 == 0 else "负面"
        words = rng.choices(filler, k=rng.randint(1, max_filler)) + rng.choices(positive if label == "正面" else negative, k=2)
        rng.shuffle(words)
        rows.append(("".join(words), label))
    return rows


DECISIVE = {"好": "正面", "差": "负面"}  # the one token of a decisive_reviews text that decides its label
NEUTRAL = "中性"  # the label of a text with neither
DECISIVE_EN = {"great": "positive", "awful": "negative"}  # the same in English words (NEUTRAL_EN: neither)
NEUTRAL_EN = "neutral"
FILLER_EN = ("the", "room", "price", "service", "box", "delivery", "this", "item", "staff", "hotel", "was")


def decisive_reviews(n, seed=0, filler="质量物流价格包装客服这个东西房间", length=(3, 9), neutral=True,
                     keys=None, neutral_label=NEUTRAL, sep=""):
    """(text, label) rows where one token decides the label: neutral tokens with one key of `keys` (DECISIVE)
    somewhere among them, or (every third row, with `neutral`) none and `neutral_label`. The third class makes
    each key necessary: with two classes a model may learn one key and read the other class from its absence.
    A model that learns the set must put the key first in an explanation. English: filler=FILLER_EN,
    keys=DECISIVE_EN, neutral_label=NEUTRAL_EN, sep=" "."""
    keys = DECISIVE if keys is None else keys
    rng = random.Random(seed)
    order = list(keys) + ([None] if neutral else [])
    rows = []
    for i in range(n):
        key = order[i % len(order)]
        tokens = rng.choices(filler, k=rng.randint(*length))
        if key is not None:
            tokens.insert(rng.randint(0, len(tokens)), key)
        rows.append((sep.join(tokens), keys.get(key, neutral_label)))
    return rows


def classifier_run(run_dir, kind="mlp", rows=60, epochs=1, max_length=32, seed=0, train_options=None, **model):
    """Train and save a tiny classifier run; returns the danlu.runs.Run. `rows`: how many synthetic reviews,
    or the (text, label) rows themselves; `train_options` override the `train` section."""
    from danlu.jobs.train import train

    os.makedirs(run_dir, exist_ok=True)
    data = os.path.join(run_dir, os.pardir, f"{os.path.basename(os.path.normpath(run_dir))}.csv")
    with open(data, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(reviews(rows, seed) if isinstance(rows, int) else rows)
    cfg = {
        "run": {"dir": str(run_dir), "seed": seed},
        "data": {"train": data, "tokenizer": {"kind": "char", "vocab_size": 500, "max_length": max_length}},
        "model": {"kind": kind, "embed_dim": 16, **({"hidden_dim": 16} if kind in ("mlp", "lstm") else {}), **model},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.01, "device": "cpu", **(train_options or {})},
    }
    return train(cfg, overwrite=True)


def language_model_run(run_dir, steps=60, seed=0, chat_template=None, chat_tokens=False, tokenizer_kind="char",
                       **model):
    """Fit a char tokenizer (or `tokenizer_kind="bpe"`: byte-level BPE) and a tiny GPT on CORPUS, save it as a
    causal_lm run; returns the Run.

    `chat_tokens=True` adds ChatML's `<|im_start|>` and `<|im_end|>` as special tokens (one id each, as
    in imported chat models) before the model is built."""
    import torch

    from danlu import config as config_mod
    from danlu.data import TextTokenizer, make_spec
    from danlu.models import build_model
    from danlu.runs import Run, save_run

    torch.manual_seed(seed)
    lines = CORPUS * 4
    tokenizer = TextTokenizer(tokenizer_kind, vocab_size=500, max_length=256).fit(lines + ["<|im_start|>user\n<|im_end|>"])
    if chat_tokens:
        tokenizer.tokenizer_.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    gpt = {"kind": "gpt", "embed_dim": 32, "num_heads": 2, "num_layers": 2, "max_positions": 256, **model}
    cfg = config_mod.load({"task": "causal_lm", "run": {"dir": str(run_dir), "seed": seed}, "model": gpt,
                           "data": {"tokenizer": {"kind": tokenizer_kind, "max_length": 256}}})
    spec = make_spec(tokenizer, ())
    net = build_model(cfg.model, spec)
    ids = [torch.tensor([spec.bos_id] + tokenizer.encode([t])[0].tolist() + [spec.eos_id]) for t in CORPUS]
    width = max(len(x) for x in ids)
    batch = torch.full((len(ids), width), spec.pad_id)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = x
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        logits = net(batch[:, :-1])  # (B, T, vocab)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 ignore_index=spec.pad_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    save_run(run_dir, cfg, net, tokenizer, labels=())
    if chat_template is not None:
        with open(os.path.join(run_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(chat_template)
    return Run(str(run_dir), cfg, net, tokenizer, ())


# ---------------------------------------------------------------------------------------------
# hostile traffic for a language-model server (tests/test_serve_load.py, benchmarks/serve.py)

SLOW_TEMPLATE = (
    "{% for m in messages %}{% if 'slow-template' in m['content'] %}{% for i in range(99999) %}"
    "{% for j in range(99999) %}{% endfor %}{% endfor %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
"""ChatML, except that a message containing `slow-template` sends it into a loop that would run for hours."""

GOOD = ("chat", "completion", "stream", "cut_emoji_chat", "cut_emoji_completion")
HOSTILE = {"invalid_utf8": 400, "huge_body": 413, "huge_message": 400, "wrong_type": 400, "unsupported": 400,
           "slow_template": 400, "text_plain": 415}
"""Each hostile kind and the status it must get; `disconnect` (a client that leaves early) gets none."""


def hostile_requests(n, model="lm", seed=0, max_body_bytes=65536, slow_every=80):
    """`n` requests for a language-model server: 60% good (GOOD), the rest hostile (HOSTILE, plus clients
    that disconnect early); one in `slow_every` is a slow-template chat. Each is a dict: kind, path, body
    (bytes), content_type, stream, expect (a status, or None for a disconnect)."""
    import json

    rng = random.Random(seed)
    chat = lambda content, **kw: json.dumps({"model": model, "messages": [{"role": "user", "content": content}],  # noqa: E731
                                             "max_tokens": 6, "temperature": 0, **kw}, ensure_ascii=False)
    out = []
    for i in range(n):
        if slow_every and i % slow_every == slow_every // 2:
            kind = "slow_template"
        elif rng.random() < 0.6:
            kind = rng.choice(GOOD)
        else:
            kind = rng.choice(["invalid_utf8", "huge_body", "huge_message", "wrong_type", "unsupported", "text_plain",
                               "disconnect"])
        path, content_type, stream = "/v1/chat/completions", "application/json", False
        if kind == "chat":
            body = chat(rng.choice(["你好", "今天天气", "hello"]))
        elif kind == "completion":
            path, body = "/v1/completions", json.dumps({"model": model, "prompt": rng.choice(["你好", "丹炉"]),
                                                        "max_tokens": 6, "temperature": 0})
        elif kind == "stream":
            body, stream = chat("你好", stream=True), True
        elif kind == "cut_emoji_chat":
            body = chat("好评").replace('"好评"', '"好评\\ud83d"')
        elif kind == "cut_emoji_completion":
            path, body = "/v1/completions", '{"model": "%s", "prompt": "丹炉\\ud83d", "max_tokens": 4}' % model
        elif kind == "invalid_utf8":
            body = chat("好评").encode().replace("好".encode(), b"\xe5\xa5")
        elif kind == "huge_body":
            body = chat("好" * max_body_bytes)
        elif kind == "huge_message":
            body = chat("好" * (max_body_bytes // 4))
        elif kind == "wrong_type":
            body = chat("你好").replace('"max_tokens": 6', '"max_tokens": "6"')
        elif kind == "unsupported":
            body = chat("你好", logit_bias={"5": 10})
        elif kind == "slow_template":
            body = chat("slow-template")
        elif kind == "text_plain":
            body, content_type = chat("你好"), "text/plain"
        else:  # disconnect: a long completion the client leaves after a few milliseconds
            path, body = "/v1/completions", json.dumps({"model": model, "prompt": "你好", "max_tokens": 64})
        out.append({"kind": kind, "path": path, "body": body.encode() if isinstance(body, str) else body,
                    "content_type": content_type, "stream": stream,
                    "expect": 200 if kind in GOOD else HOSTILE.get(kind)})
    return out


async def send_all(url, requests, api_key=None, concurrency=32, leave_after=0.005):
    """Send `requests` (hostile_requests) with `concurrency` kept-alive httpx clients -> one outcome per request:
    its status, -1 for a stream that did not end with [DONE] or carried an error, None for a disconnect."""
    import asyncio

    import httpx

    queue = asyncio.Queue()
    for i, r in enumerate(requests):
        queue.put_nowait((i, r))
    outcomes = [None] * len(requests)
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one(i, r):
            headers = {**auth, "content-type": r["content_type"]}
            if r["expect"] is None and r["kind"] == "disconnect":
                try:
                    await asyncio.wait_for(client.post(r["path"], content=r["body"], headers=headers), leave_after)
                    outcomes[i] = None  # answered before the client left: fine either way
                except asyncio.TimeoutError:
                    outcomes[i] = None
                return
            if r["stream"]:
                async with client.stream("POST", r["path"], content=r["body"], headers=headers) as response:
                    text = "".join([line async for line in response.aiter_lines()])
                    ok = text.endswith("data: [DONE]") and '"error"' not in text
                    outcomes[i] = response.status_code if ok or response.status_code != 200 else -1
                return
            outcomes[i] = (await client.post(r["path"], content=r["body"], headers=headers)).status_code

        async def worker():
            while not queue.empty():
                await one(*queue.get_nowait())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes
