"""A seeded sample of the test reviews that a TF-IDF + logistic regression baseline gets wrong on the
built-in zh_sentiment split, to read by eye: how many of them carry the sentiment of their label?

    python scripts/zh_sentiment_errors.py [--n 60] [--seed 1]

docs/evaluation.md reports the reading of the default sample.
"""
import argparse
import random

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from danlu.data.builtin import zh_sentiment


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60, help="mistakes to print")
    parser.add_argument("--seed", type=int, default=1, help="seed of the sample")
    args = parser.parse_args()
    data = zh_sentiment()
    train, test = data["train"], data["test"]
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    model = LogisticRegression(C=4, max_iter=2000).fit(vectorizer.fit_transform(train.texts), train.labels)
    predicted = model.predict(vectorizer.transform(test.texts))
    wrong = [i for i, (p, y) in enumerate(zip(predicted, test.labels)) if p != y]
    print(f"test accuracy {np.mean(predicted == np.array(test.labels)):.4f}; {len(wrong)} of {len(test.texts)} wrong")
    random.Random(args.seed).shuffle(wrong)
    for k, i in enumerate(wrong[: args.n], 1):
        print(f"{k:3d}  label {test.labels[i]}  {test.origins[i]}  {test.texts[i][:150]}")


if __name__ == "__main__":
    main()
