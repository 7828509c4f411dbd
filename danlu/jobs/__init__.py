"""The jobs behind the verbs, each a few steps on one skeleton (skeleton.py):

    train.py      danlu train      labelled data -> classifier / regressor
    pretrain.py   danlu pretrain   corpus -> causal or masked language model
    finetune.py   danlu finetune   a pretrained base -> classification or chat (full, LoRA, freeze)
    evaluate.py   danlu evaluate   a run scored on new data
    compress.py   danlu compress   a run -> a compressed run and its scorecard

Jobs read and write run directories (danlu.runs); nothing below them imports a job.
"""
