"""GGUF export checked token for token: danlu's greedy decoding against the exported file read back by
danlu's GGUF importer and by llama.cpp (llama-cpp-python), for each run and tensor type.

By default two runs are made here: a short `danlu pretrain configs/pretrain_gpt_en.yaml` (GPT-2 recipe,
byte-level BPE fitted on Shakespeare, --gguf-steps steps) and a short LoRA `danlu finetune
configs/lora_smollm2_chat.yaml` on the packaged SmolLM2-135M (Llama recipe; the adapter is merged by the
export). `--gguf-runs` takes existing run directories instead. With --quick: two tiny runs of
danlu.testing (GPT-2 and Llama recipes, the Llama one with a random LoRA adapter).

llama.cpp is an optional reader: where `import llama_cpp` fails the column says so. llama-cpp-python
ships as a source package only; it builds llama.cpp with cmake and a C++ compiler:

    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF" pip install --target /tmp/llcpp llama-cpp-python diskcache
    PYTHONPATH=/tmp/llcpp python benchmarks/run.py --only gguf_parity --threads 1

Columns: tokens each reader decoded the same as the run (greedy, `--gguf-new` tokens after each of the
export's prompts, no early stop), the first difference, the file's size.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

NAME = "gguf_parity"


def add_arguments(parser):
    group = parser.add_argument_group(NAME)
    group.add_argument("--gguf-runs", help="comma-separated run directories (default: a short pretrain and LoRA fine-tune)")
    group.add_argument("--gguf-dtypes", default="f32,f16,q8_0", help="comma-separated tensor types (default f32,f16,q8_0)")
    group.add_argument("--gguf-new", type=int, help="greedy tokens per prompt (default 32; 8 with --quick)")
    group.add_argument("--gguf-steps", type=int, default=200, help="steps of the default pretrain (default 200)")
    group.add_argument("--gguf-out", help="folder for the runs and files made here (default: a temporary one)")


def default_runs(folder, steps, quick):
    if quick:
        import torch

        from danlu.models.lora import apply_lora
        from danlu.testing import language_model_run

        gpt2 = language_model_run(f"{folder}/gpt2", steps=30, tokenizer_kind="bpe")
        llama = language_model_run(f"{folder}/llama", steps=30, tokenizer_kind="bpe", positions="rope", norm="rmsnorm",
                                   mlp="swiglu", bias=False, num_kv_heads=1, tie_embeddings=False)
        apply_lora(llama.model, ["*.attn.qkv"], r=2, alpha=4)
        with torch.no_grad():
            for name, p in llama.model.named_parameters():
                if name.endswith("lora_b"):
                    p.normal_(0, 0.5)
        return [("tiny gpt2-recipe", gpt2), ("tiny llama-recipe + LoRA", llama)]
    from danlu.jobs.finetune import finetune
    from danlu.jobs.pretrain import pretrain

    root = Path(__file__).resolve().parent.parent
    pretrained = pretrain(str(root / "configs/pretrain_gpt_en.yaml"), f"run.dir={folder}/pretrain_gpt_en",
                          f"train.max_steps={steps}", "train.eval_every=1000000", overwrite=True)
    lora = finetune(str(root / "configs/lora_smollm2_chat.yaml"), f"run.dir={folder}/lora_smollm2_chat",
                    "train.epochs=1", "train.max_steps=4", overwrite=True)
    return [(f"pretrain_gpt_en ({steps} steps)", pretrained.path), ("lora_smollm2_chat (4 steps, merged)", lora.path)]


def run(args):
    from danlu.serve.gguf_export import export_gguf

    quick = getattr(args, "quick", False)
    new = getattr(args, "gguf_new", None) or (8 if quick else 32)
    dtypes = (getattr(args, "gguf_dtypes", None) or "f32,f16,q8_0").split(",")
    folder = getattr(args, "gguf_out", None) or tempfile.mkdtemp(prefix="danlu-gguf-")
    given = getattr(args, "gguf_runs", None)
    runs = [(path, path) for path in given.split(",")] if given else \
        default_runs(folder, getattr(args, "gguf_steps", 200), quick)
    threads = max(1, getattr(args, "threads", 0) or 1)
    rows = []
    for label, run_ in runs:
        for dtype in dtypes:
            report = export_gguf(run_, out=f"{folder}/gguf/{len(rows)}", dtype=dtype, max_new_tokens=new,
                                 threads=threads)
            parity = report["parity"]
            ours, theirs = parity["danlu_gguf"], parity["llama_cpp"]
            rows.append({
                "run": label, "architecture": report["architecture"], "dtype": dtype,
                "MiB": round(report["bytes"] / 2**20, 1), "prompts": len(parity["prompts"]), "new_tokens": new,
                "danlu_importer_same": f"{ours['tokens_matched']}/{ours['tokens']}",
                "llama_cpp_same": theirs if isinstance(theirs, str) else f"{theirs['tokens_matched']}/{theirs['tokens']}",
                "first_difference_llama_cpp": "-" if isinstance(theirs, str) else (theirs["first_difference"] or "none"),
                "llama_cpp": "-" if isinstance(theirs, str) else theirs["version"],
            })
    return rows


if __name__ == "__main__":  # the same as: python benchmarks/run.py --only NAME [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run as harness

    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
