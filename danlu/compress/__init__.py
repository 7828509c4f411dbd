"""Model compression as functions from a model to a model:

    quantize.py   dynamic int8, static int8 (CNNs), weight-only int8 / int4
    prune.py      magnitude (unstructured) and structured pruning (heads, feed-forward neurons, channels)
    distill.py    knowledge distillation as a Task run by the same Trainer (Hinton et al. 2015)
    scorecard.py  the before / after scorecard of two runs

Recipes that chain them into a new run directory are the compress job's (danlu.jobs.compress);
compressed runs are read by danlu.runs.compressed.
"""
