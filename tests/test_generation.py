"""Text generation: batched left-padded decoding with the KV cache, sampling options, stop strings, streaming."""
import copy

import pytest
import torch

from danlu.data.corpus import lm_spec
from danlu.data.tokenizer import TextTokenizer
from danlu.generation import IncrementalDecoder, encode_prompts, generate, generate_ids, sample, stream_generate
from danlu.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")



TEXT = ["the king speaks of love and war. 我们爱中国，中国人民很好。", "a storm in the night; the queen is gone.",
        "to be or not to be, that is the question. 今天天气很好。"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer("bpe", vocab_size=400, max_length=0, lowercase=False).fit(TEXT)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(num_layers=2, embed_dim=32, num_heads=2, max_positions=64)
    return GPT(config, lm_spec(tokenizer, 64)).eval()


class EndsAfter(GPT):
    """A GPT that puts all its mass on </s> once `after` tokens have been generated."""

    def __init__(self, config, spec, prompt_length, after):
        super().__init__(config, spec)
        self.stop_at, self.eos = prompt_length + after, spec.eos_id

    def forward(self, input_ids, attention_mask=None, cache=None, positions=None, **options):
        logits = super().forward(input_ids, attention_mask, cache, positions, **options)
        if cache is not None and cache.length >= self.stop_at:
            logits[..., self.eos] = 1e4
        return logits


def test_batched_left_padding_matches_one_by_one(model, tokenizer):
    prompts = ["the king", "to be or not to be, that", "我们"]
    together = generate(model, tokenizer, prompts, max_new_tokens=12, temperature=0)
    alone = [generate(model, tokenizer, [p], max_new_tokens=12, temperature=0)[0] for p in prompts]
    assert together == alone and all(together)


@torch.no_grad()
def test_kv_cache_decoding_matches_full_recomputation(model, tokenizer):
    ids, mask = encode_prompts(tokenizer, ["the queen is"], 32)
    cached = torch.stack(list(generate_ids(model, ids, mask, max_new_tokens=8, temperature=0)), 1)  # (1, 8)
    seq = ids
    for _ in range(8):
        seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached, seq[:, ids.shape[1]:])


def test_stream_joins_to_generate_and_seeds_repeat(model, tokenizer):
    options = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, seed=3)
    text = generate(model, tokenizer, ["the king"], **options)[0]
    deltas = list(stream_generate(model, tokenizer, "the king", **options))
    assert "".join(deltas) == text and len(deltas) > 1
    assert generate(model, tokenizer, ["the king"], **options)[0] == text
    others = {generate(model, tokenizer, ["the king"], **{**options, "seed": s})[0] for s in range(4)}
    assert len(others) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, ["a storm"], max_new_tokens=10, temperature=0)
    assert generate(model, tokenizer, ["a storm"], max_new_tokens=10, top_k=1, seed=0) == greedy
    assert generate(model, tokenizer, ["a storm"], max_new_tokens=10, top_p=1e-6, seed=1) == greedy


def test_stop_strings_cut_the_text(model, tokenizer):
    full = generate(model, tokenizer, ["the king"], max_new_tokens=30, temperature=0)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    assert generate(model, tokenizer, ["the king"], max_new_tokens=30, temperature=0, stop=[stop]) == [expected]
    deltas = list(stream_generate(model, tokenizer, "the king", max_new_tokens=30, temperature=0, stop=[stop, "\x00"]))
    assert "".join(deltas) == expected


def test_end_of_text_ends_a_row(tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(num_layers=1, embed_dim=16, num_heads=2, max_positions=64)
    prompt_ids, _ = encode_prompts(tokenizer, ["the king", "a storm in the night"], 64)
    model = EndsAfter(config, lm_spec(tokenizer, 64), prompt_ids.shape[1], after=3).eval()
    steps = list(generate_ids(model, *encode_prompts(tokenizer, ["the king", "a storm in the night"], 64),
                              max_new_tokens=20, temperature=0, eos_id=tokenizer.token_id("</s>")))
    assert len(steps) == 4  # 3 tokens, then </s> in every row ends the loop
    texts = generate(model, tokenizer, ["the king", "a storm in the night"], max_new_tokens=20, temperature=0)
    assert all(len(tokenizer.tokenizer_.encode(t).ids) <= 3 for t in texts)


def test_utf8_characters_are_never_split():
    tok = TextTokenizer("bpe", vocab_size=270, max_length=0, lowercase=False).fit(["ab"])  # bytes only: 3 per 汉字
    text = "我们爱中国。今天天气很好。"
    ids = tok.tokenizer_.encode(text).ids
    assert len(ids) == 3 * len(text)
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) + decoder.flush() == text
    assert all("\ufffd" not in d for d in deltas) and sum(bool(d) for d in deltas) == len(text)


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, -2.0, 1.0]])
    seen = torch.tensor([[True, False, True, False]])
    assert sample(logits, temperature=0).item() == 0
    assert sample(logits, temperature=0, repetition_penalty=2.0, seen=seen).item() == 1  # 4/2 = 2 < 3
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample(logits, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {0}  # token 0 alone holds more than half of the mass


def test_long_prompts_keep_their_end(model, tokenizer):
    long = " ".join(["the king speaks"] * 100)
    ids, mask = encode_prompts(tokenizer, [long, "a"], 20)
    assert ids.shape == (2, 20) and mask[1].sum() == 1 and not mask[1, 0]
    assert len(generate(model, tokenizer, [long], max_new_tokens=10, temperature=0)[0]) > 0


def test_empty_prompt_starts_a_document(model, tokenizer):
    ids, _ = encode_prompts(tokenizer, [""], 10)
    assert ids.tolist() == [[tokenizer.token_id("</s>")]]
    assert isinstance(generate(model, tokenizer, [""], max_new_tokens=5, seed=0)[0], str)


def test_same_tokens_as_transformers_gpt2_on_the_same_weights(model):
    """Parity: the GPT-2 recipe is GPT-2 — logits agree and greedy decoding picks the same tokens."""
    pytest.importorskip("transformers")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_gpt2.py"
    spec = importlib.util.spec_from_file_location("_gpt2", path)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    config = GPTConfig(num_layers=2, embed_dim=32, num_heads=2, max_positions=64, mlp="gelu_tanh")
    torch.manual_seed(1)
    ours = GPT(config, lm_spec_like(model)).eval()
    theirs = converter.gpt2_model(ours).eval()
    assert converter.max_logit_difference(ours, theirs, ours.embed.num_embeddings) < 1e-4
    ids = torch.randint(7, ours.embed.num_embeddings, (1, 6), generator=torch.Generator().manual_seed(2))
    mine = torch.stack(list(generate_ids(ours, ids, max_new_tokens=12, temperature=0)), 1)
    with torch.no_grad():
        reference = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                    min_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(mine, reference[:, 6:])


def lm_spec_like(model):
    from danlu.data.spec import DataSpec

    return DataSpec(vocab_size=model.embed.num_embeddings, num_classes=0, max_length=64)


def test_decode_precision_casts_and_refuses_dynamic_int8(model, tokenizer):
    from danlu.generation import set_decode_precision
    from danlu.registry import ConfigError

    half = set_decode_precision(copy.deepcopy(model), "bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert generate(half, tokenizer, ["the king"], max_new_tokens=4, temperature=0)  # decodes
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ConfigError, match="int8 layers .* compute in fp32 only"):
        set_decode_precision(int8, "bf16")
    assert set_decode_precision(int8, "fp32") is int8
    with pytest.raises(ConfigError, match="precision: unknown value 'fp8'"):
        set_decode_precision(model, "fp8")


def test_a_model_can_train_after_generating(tokenizer):
    """Decoding runs in inference mode; the weights it re-lays for decoding must come back as ordinary tensors,
    or the model can never take a gradient (or a LoRA merge) again."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(num_layers=1, embed_dim=32, num_heads=2, max_positions=64), lm_spec(tokenizer, 64))
    generate(model, tokenizer, ["the king"], max_new_tokens=3, temperature=0)
    assert not any(p.is_inference() for p in model.parameters())
    assert model.head.weight is model.embed.weight  # decoding gave the tied head its own copy, and took it back
    model(torch.tensor([[5, 6, 7]])).sum().backward()
    assert model.head.weight.grad is not None


def test_sampling_with_a_temperature_or_penalty_near_zero_stays_finite():
    """5e-324 is a valid float: dividing logits by it overflows to inf, and softmax over infs is NaN."""
    logits = torch.tensor([[2.0, 5.0, -1.0, 0.5], [-3.0, -0.5, -2.0, 1.5]])
    seen = torch.tensor([[True, False, True, False], [False, True, False, False]])
    g = torch.Generator().manual_seed(0)
    # a temperature near 0 is greedy, its limit: 5 on row 0, and on row 1 1.5 (-0.5 is seen, so -0.5 x 1.1)
    ids = sample(logits, temperature=5e-324, top_k=0, top_p=1.0, repetition_penalty=1.1, seen=seen, generator=g)
    assert ids.tolist() == [1, 3]
    # a penalty near 0 sends a seen positive logit (row 0's 2.0) beyond every other: it is always drawn
    for temperature in (1.0, 5e-324):
        for _ in range(20):
            ids = sample(logits, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=5e-324, seen=seen,
                         generator=g)
            assert ids[0].item() == 0 and 0 <= ids[1].item() < 4


def test_last_only_keeps_the_last_positions_logits(model, tokenizer):
    """The prompt's forward before decoding computes the head for the last position only; its logits are the full
    forward's last ones, with and without the cache and with left padding."""
    ids, mask = encode_prompts(tokenizer, ["the king speaks", "a"], 32)
    with torch.no_grad():
        full = model(ids, mask)  # (B, T, V)
        last = model(ids, mask, last_only=True)
        cached = model(ids, mask, cache=model.new_cache(2, ids.shape[1]), last_only=True)
    assert last.shape == cached.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:])
    torch.testing.assert_close(cached, full[:, -1:])


def test_decode_layout_packs_or_re_lays_the_weights_only_for_batches(model, monkeypatch):
    """One row a step runs as fast on nn.Linear's own layout, so nothing is copied. From LAYOUT_MIN_ROWS rows on,
    a decode of a fixed batch computes every linear layer from MKL's packed copy of its weight (the weights
    themselves untouched), or, without MKL, from weights stored (in, out); a batch of changing size (rows=None)
    gets the (in, out) layout. Everything comes back after, and the logits are the plain layout's."""
    from danlu import generation
    from danlu.generation import LAYOUT_MIN_ROWS, decode_layout
    from danlu.kernels.packed_linear import packing_available

    weight = model.blocks[0].ffn.up.weight
    storage = weight.data_ptr()
    ids = torch.randint(0, 300, (LAYOUT_MIN_ROWS, 6), generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    names = list(model.state_dict())

    def step_logits():  # a prompt, then one decoding step of LAYOUT_MIN_ROWS rows
        with torch.inference_mode():
            cache = model.new_cache(LAYOUT_MIN_ROWS, 7)
            model(ids[:, :-1], cache=cache)
            return model(ids[:, -1:], cache=cache)

    plain = step_logits()
    with decode_layout(model, rows=1):
        assert weight.is_contiguous() and weight.data_ptr() == storage
        assert model.head.weight is model.embed.weight
    for packing in ([True, False] if packing_available() else [False]):
        monkeypatch.setattr(generation, "packable", generation.packable if packing else lambda module: False)
        with decode_layout(model, rows=LAYOUT_MIN_ROWS):
            if packing:
                assert weight.is_contiguous() and weight.data_ptr() == storage
                assert model.head.weight is model.embed.weight
                assert all("forward" in vars(m) for m in linears)
                assert list(model.state_dict()) == names
            else:
                assert not weight.is_contiguous() and weight.t().is_contiguous()
                assert model.head.weight is not model.embed.weight and model.head.weight.t().is_contiguous()
            torch.testing.assert_close(step_logits(), plain, rtol=1e-5, atol=1e-5)
        assert weight.is_contiguous() and model.head.weight is model.embed.weight
        assert not any("forward" in vars(m) for m in linears)
    monkeypatch.undo()
    with decode_layout(model):  # rows unknown (a serving batch): the (in, out) layout, never a packed copy
        assert not weight.is_contiguous() and not any("forward" in vars(m) for m in linears)
    assert weight.is_contiguous()


def test_layouts_decode_the_same_tokens(model, tokenizer):
    """A batch of one and the same prompt among a batch of LAYOUT_MIN_ROWS (re-laid weights) pick the same tokens."""
    from danlu.generation import LAYOUT_MIN_ROWS

    prompts = ["the king", "to be or not to be", "我们", "a storm in the"][:LAYOUT_MIN_ROWS]
    together = generate(model, tokenizer, prompts, max_new_tokens=12, temperature=0)
    assert together[0] == generate(model, tokenizer, prompts[:1], max_new_tokens=12, temperature=0)[0]


def test_dropout_of_zero_is_no_module_call_and_dropout_still_drops():
    from danlu.models.blocks import make_dropout

    assert isinstance(make_dropout(0.0), torch.nn.Identity)
    drop = make_dropout(0.5).train()
    assert isinstance(drop, torch.nn.Dropout) and (drop(torch.ones(1000)) == 0).any()
    from danlu.data.spec import DataSpec

    torch.manual_seed(0)
    spec = DataSpec(vocab_size=64, num_classes=0, max_length=64)
    dropped = GPT(GPTConfig(num_layers=1, embed_dim=16, num_heads=2, max_positions=64, dropout=0.5), spec).train()
    ids = torch.randint(0, 64, (2, 8))
    assert not torch.equal(dropped(ids), dropped(ids))  # training with dropout > 0 stays random
