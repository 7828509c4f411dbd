"""The run directory: the only contract between stages, and the one owner of its formats.

    layout.py             file names; RunDirectory (an existing run is replaced only once the new one can start)
    run.py                Run (predict), save_run / write_run_files
    adapter.py            LoRA runs stored as an adapter over a base
    compressed.py         compressed runs: compression.json, and the rebuild before the weights load
    load.py               load_run for every kind of run; load_base, the bases fine-tuning starts from
    import_checkpoint.py  foreign checkpoints: Hugging Face folders and GGUF files, into danlu's models

Reading a run imports no job and no training loop (tests/test_layering.py holds it to that).

>>> run = load_run("runs/seed_lstm")                      # doctest: +SKIP
>>> run.predict(["质量很好，物流也快"])[0]["label"]          # doctest: +SKIP
'正面'
"""
from danlu.runs.layout import RunDirectory, prepare_run_dir, run_kind, weights_file
from danlu.runs.load import load_run
from danlu.runs.run import Run, language_model_verbs, run_spec, save_run, save_tokenizer, write_run_files

__all__ = ["Run", "RunDirectory", "language_model_verbs", "load_run", "prepare_run_dir", "run_kind", "run_spec",
           "save_run", "save_tokenizer", "weights_file", "write_run_files"]
