"""GGUF export (danlu.serve.gguf_export): GPT-2- and Llama-recipe runs written for llama.cpp, read back by three
readers that share no code with the writer's model: danlu's GGUF importer (greedy tokens), transformers' GGUF
loader (logits, tokenizer ids) and, where llama-cpp-python is installed, llama.cpp itself (greedy tokens).
"""
import os

import pytest
import torch

gguf = pytest.importorskip("gguf")

from danlu.registry import ConfigError
from danlu.runs.import_checkpoint import unpermute_rope
from danlu.serve.gguf_export import export_gguf, permute_rope
from danlu.testing import language_model_run

torch.set_num_threads(1)
LLAMA = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "num_kv_heads": 1, "tie_embeddings": False}
GPT2 = {"max_positions": 1024, "mlp": "gelu_tanh"}  # transformers' GGUF reader builds GPT-2 with 1024 positions


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A GPT-2-recipe run and a Llama-recipe run (GQA, untied head) with a LoRA adapter, byte-level BPE both."""
    from danlu.models.lora import apply_lora

    folder = tmp_path_factory.mktemp("gguf")
    gpt2 = language_model_run(str(folder / "gpt2"), steps=30, tokenizer_kind="bpe", **GPT2)
    llama = language_model_run(str(folder / "llama"), steps=30, tokenizer_kind="bpe", **LLAMA)
    torch.manual_seed(1)
    apply_lora(llama.model, ["*.attn.qkv", "*.ffn.up"], r=2, alpha=4)
    with torch.no_grad():  # an adapter that changes the outputs, as a fine-tune's does
        for name, p in llama.model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.5)
    return {"gpt2": gpt2, "llama": llama}


def test_permutation_is_undone_by_the_importer():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope(permute_rope(w, 3), 3), w)
    assert not torch.equal(permute_rope(w, 3), w)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exported_file_decodes_the_runs_greedy_tokens(runs, arch, tmp_path):
    run = runs[arch]
    report = export_gguf(run, out=str(tmp_path), dtype="f32", max_new_tokens=12)
    assert report["architecture"] == arch
    side = report["parity"]["danlu_gguf"]
    assert side["same_tokens"] and side["tokens_matched"] == side["tokens"] == 12 * len(report["parity"]["prompts"])
    assert side["max_abs_logit_diff"] < 1e-4
    reader = gguf.GGUFReader(os.path.join(tmp_path, "model.gguf"))
    fields = reader.fields
    assert fields["general.architecture"].contents() == arch
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == run.model.embed.num_embeddings and tokens[run.tokenizer.token_id("</s>")] == "</s>"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == run.tokenizer.token_id("</s>")
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[run.tokenizer.token_id("[PAD]")] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.NORMAL
    names = {t.name for t in reader.tensors}
    expected = {"llama": {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "output.weight"},
                "gpt2": {"blk.0.attn_qkv.bias", "position_embd.weight", "output_norm.bias"}}[arch]
    assert expected <= names


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformers_reads_the_file_with_the_same_logits_and_token_ids(runs, arch, tmp_path):
    """An independent reader: transformers' GGUF loader undoes llama.cpp's q/k row order itself, so matching
    logits show the permutation is llama.cpp's, not merely one that danlu's importer inverts."""
    transformers = pytest.importorskip("transformers")
    run = runs[arch]
    export_gguf(run, out=str(tmp_path), check=False)
    transformers.logging.set_verbosity_error()
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf",
                                                                  dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    text = "你好, the quick brown fox. 丹炉"
    ids = run.tokenizer.tokenizer_.encode(text, add_special_tokens=False).ids
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        got = run.model.eval()(torch.tensor([ids]))
        assert (reference(torch.tensor([ids])).logits - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smaller_types_are_written_and_checked(runs, dtype, tmp_path):
    f32 = export_gguf(runs["llama"], out=str(tmp_path / "f32"), check=False)
    # llama.cpp is left out here: these are the writer's types (llama.cpp's own check is the test at the end)
    report = export_gguf(runs["llama"], out=str(tmp_path / dtype), dtype=dtype, max_new_tokens=8, llama_cpp=False)
    assert report["bytes"] < 0.75 * f32["bytes"]
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(os.path.join(tmp_path, dtype, "model.gguf")).tensors}
    want = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    assert kinds["blk.0.attn_q.weight"] == want and kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    side = report["parity"]["danlu_gguf"]
    assert side["tokens_matched"] >= side["tokens"] // 2  # lossy by design: reported, not failed


def test_runs_without_a_llama_cpp_counterpart_are_refused_by_name(tmp_path):
    from danlu.testing import classifier_run

    char = language_model_run(str(tmp_path / "char"), steps=1)
    with pytest.raises(ConfigError, match="byte-level BPE"):
        export_gguf(char, out=str(tmp_path / "a"))
    mixed = language_model_run(str(tmp_path / "mixed"), steps=1, tokenizer_kind="bpe", positions="rope")
    with pytest.raises(ConfigError, match="positions=rope, norm=layernorm"):
        export_gguf(mixed, out=str(tmp_path / "b"))
    classifier = classifier_run(str(tmp_path / "cls"))
    with pytest.raises(ConfigError, match="task causal_lm"):
        export_gguf(classifier, out=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="--dtype"):
        export_gguf(char, out=str(tmp_path / "d"), dtype="q4")


def test_cli_export_gguf(runs, capsys):
    from danlu.cli import main

    assert main(["export", runs["gpt2"].path, "--format", "gguf", "--dtype", "f16"]) == 0
    printed = capsys.readouterr().out
    assert "GGUF (gpt2, f16" in printed and "danlu's GGUF importer: " in printed and "llama.cpp" in printed
    assert os.path.exists(os.path.join(runs["gpt2"].path, "export", "gguf", "model.gguf"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_llama_cpp_decodes_the_runs_greedy_tokens(runs, arch, tmp_path):
    """The independent runtime: llama.cpp (llama-cpp-python, built from source where installed)."""
    pytest.importorskip("llama_cpp")
    report = export_gguf(runs[arch], out=str(tmp_path), dtype="f32", max_new_tokens=12)
    side = report["parity"]["llama_cpp"]
    assert side["same_tokens"], side["first_difference"]
    assert side["tokens_matched"] == 12 * len(report["parity"]["prompts"])
