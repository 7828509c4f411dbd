"""Chat and instruction data: JSONL conversations -> token ids with the loss masked to assistant tokens.

Two row shapes are read, one JSON object a line:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}
    {"instruction": "...", "input": "...", "output": "..."}        (Alpaca, Taori et al. 2023)

Each conversation is rendered with the run's chat template (the text the model will see at chat time)
and tokenized once. A token is a target when it starts inside an assistant turn's rendered text: the
answer and its end-of-turn marker, never the system prompt, the user's words or the template's role
headers (as in InstructGPT-style supervised fine-tuning, Ouyang et al. 2022).

>>> data = encode_chat(read_chat("chat.jsonl"), tokenizer, template, max_length=512)   # doctest: +SKIP
>>> batch = next(data.batches(8))   # input_ids, attention_mask, labels (-100 off the assistant turns)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from danlu.chat_template import render_chat
from danlu.data.sources import DataError, jsonl_records
from danlu.data.spec import IGNORE


def read_chat(path, system="", encoding="auto", pair_columns=None):
    """A JSONL file -> list of conversations ([{role, content}]); `system` is prepended where none is given.

    With pair_columns = (source column, target column), rows holding those two fields (JSONL), or a CSV /
    TSV table with those columns, are seq2seq pairs: the source is the user turn, the target the answer
    (and `system`, e.g. "Summarize the text in one sentence.", the instruction)."""
    if pair_columns and not str(path).lower().endswith((".jsonl", ".json", ".ndjson")):
        from danlu.data.sources import read_examples

        pairs = read_examples(path, pair_columns[0], pair_columns[1], encoding=encoding)
        return [pair_messages(s, t, system) for s, t in zip(pairs.texts, pairs.labels)]
    conversations = [to_messages(row, f"{path}:{number}", system, pair_columns)
                     for number, row in jsonl_records(path, encoding=encoding)]
    if not conversations:
        raise DataError(f"{path}: no conversations")
    return conversations


def is_pair_file(path, pair_columns):
    """Whether a chat-data file holds seq2seq pairs: a CSV / TSV table with the two `pair_columns`, or JSONL
    whose first row has them and neither messages nor an instruction."""
    if str(path).lower().endswith((".csv", ".tsv")):
        import csv

        from danlu.data.sources import text_lines

        for _, line in text_lines(path):
            header = next(csv.reader([line], delimiter="\t" if str(path).lower().endswith(".tsv") else ","))
            return set(pair_columns) <= {h.strip() for h in header}
        return False
    if not str(path).lower().endswith((".jsonl", ".json", ".ndjson")):
        return False
    for _, row in jsonl_records(path, errors="replace"):
        return isinstance(row, dict) and "messages" not in row and "instruction" not in row and set(pair_columns) <= set(row)
    return False


def pair_messages(source, target, system=""):
    """A seq2seq pair as a conversation: [system], user = source, assistant = target."""
    messages = [{"role": "user", "content": str(source)}, {"role": "assistant", "content": str(target)}]
    return ([{"role": "system", "content": system}] if system else []) + messages


def to_messages(row, where="row", system="", pair_columns=None):
    """One JSONL row (messages, Alpaca's instruction / input / output, or the two `pair_columns` of a
    seq2seq pair) -> [{role, content}]."""
    if pair_columns and isinstance(row, dict) and "messages" not in row and "instruction" not in row:
        source, target = pair_columns
        for column, key in ((source, "source_column"), (target, "target_column")):
            if not isinstance(row.get(column), str) or not row[column].strip():
                raise DataError(f"{where}: no text in {column!r} (data.{key}); fields found: {', '.join(row) or 'none'}")
        return pair_messages(row[source], row[target], system)
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
            raise DataError(f"{where}: messages must be a list of {{role, content}} objects")
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    elif isinstance(row, dict) and "instruction" in row and "output" in row:
        prompt = str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
    else:
        raise DataError(f"{where}: expected {{\"messages\": [...]}} or {{\"instruction\", \"input\", \"output\"}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def render_with_spans(template, messages, **variables):
    """(text, [(start, end)] character spans of the assistant turns) under `template`.

    An assistant turn's span is what rendering it adds after the generation prompt: the text between
    render(messages[:i], add_generation_prompt=True) and render(messages[:i + 1]).
    """
    text = render_chat(template, messages, add_generation_prompt=False, **variables)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(template, messages[:i], add_generation_prompt=True, **variables)
        through = render_chat(template, messages[: i + 1], add_generation_prompt=False, **variables)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError("chat template: rendering is not incremental, so assistant turns cannot be located")
        spans.append((len(before), len(through)))
    return text, spans


def encode_chat(conversations, tokenizer, template, max_length=512) -> ChatDataset:
    """Render, tokenize (offsets locate each token in the text) and mark the assistant tokens."""
    variables = {"bos_token": _token(tokenizer, "<s>"), "eos_token": _token(tokenizer, "</s>")}
    ids, targets = [], []
    answers = lost = 0  # conversations with answer tokens; those whose answer max_length cuts off entirely
    for messages in conversations:
        text, spans = render_with_spans(template, messages, **variables)
        enc = tokenizer.tokenizer_.encode(text, add_special_tokens=False)
        starts = np.asarray([start for start, _ in enc.offsets], dtype=np.int64)
        target = np.zeros(len(starts), dtype=bool)
        for lo, hi in spans:
            target |= (starts >= lo) & (starts < hi)
        ids.append(np.asarray(enc.ids[:max_length], dtype=np.int64))
        targets.append(target[:max_length])
        answers += bool(target[1:].any())
        lost += bool(target[1:].any()) and not target[1:max_length].any()
    dataset = ChatDataset(ids, targets, tokenizer.pad_id or 0)
    dataset.answers, dataset.lost = answers, lost
    dataset.conversations = list(conversations)  # the texts, for scoring generated answers (seq2seq pairs)
    return dataset


def _token(tokenizer, name):
    index = tokenizer.token_id(name)
    return tokenizer.tokenizer_.id_to_token(index) if index is not None else ""


class ChatDataset:
    """Token sequences with a target mask; right-padded batches of input_ids, attention_mask and labels
    (B, T), where labels[t] is token t + 1 when that token is a target, else IGNORE."""

    def __init__(self, ids, targets, pad_id=0):
        self.ids, self.targets, self.pad_id = ids, targets, pad_id

    def __len__(self):
        return len(self.ids)

    @property
    def supervised_tokens(self):
        """Tokens the loss is computed on (the assistant tokens kept within max_length, after the first)."""
        return int(sum(int(t[1:].sum()) for t in self.targets))

    def num_batches(self, batch_size):
        return math.ceil(len(self.ids) / batch_size)

    def batches(self, batch_size, *, epoch=0, seed=0, skip=0, shuffle=True):
        order = np.arange(len(self.ids))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(len(self.ids))
        for b in range(skip, self.num_batches(batch_size)):
            yield self.collate(order[b * batch_size : (b + 1) * batch_size])

    def collate(self, rows):
        width = max(len(self.ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, i in enumerate(rows):
            ids, target = torch.from_numpy(self.ids[i]), torch.from_numpy(self.targets[i])
            n = len(ids)
            input_ids[r, :n], mask[r, :n] = ids, True
            labels[r, : n - 1] = ids[1:].masked_fill(~target[1:], IGNORE)  # predict the next token where it is a target
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
