"""A real English summarization set from Debian's package descriptions: each long description (2 to 6
sentences of prose) with its synopsis, the one-line summary its maintainer wrote, as JSONL
{"text": ..., "summary": ...}. The synopsis is written apart from the description, so the lead sentence is a
fair baseline rather than the answer.

    apt-get update -o Acquire::Languages=en
    lz4 -dc /var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en.lz4 > Translation-en
    python scripts/debian_synopses.py Translation-en debian_synopses.jsonl --n 400

Packages whose descriptions follow a template (libraries, bindings, -dev / -doc / -data splits, fonts,
transitional and meta packages) are left out, as are descriptions with lists or preformatted lines, and
any description or synopsis whose opening repeats one already taken (sibling packages share them).
docs/results/lora_smollm2_summarize.md reports a run on it.
"""
import argparse
import json
import random
import re

SKIP_PREFIX = ("lib", "golang-", "node-", "r-cran-", "r-bioc-", "ruby-", "php-", "python3-", "python-", "texlive",
               "fonts-", "gir1.2-", "haskell-", "elpa-", "ocaml", "coq", "tryton-", "octave-", "vim-", "xfonts-",
               "firmware-", "linux-")
SKIP_SUFFIX = ("-dev", "-doc", "-dbg", "-data", "-common", "-dbgsym", "-examples", "-tests", "-perl", "-java")


def pairs(text):
    seen = set()
    for block in text.split("\n\n"):
        m = re.match(r"Package: (\S+)\n.*?Description-en: (.*?)\n(.*)", block, re.DOTALL)
        if not m:
            continue
        name, synopsis, body = m.groups()
        if name.startswith(SKIP_PREFIX) or name.endswith(SKIP_SUFFIX):
            continue
        lines = [line[1:] for line in body.split("\n")]
        if any(line.strip().startswith(("*", "-", "+", "o ")) or line.startswith("  ") for line in lines):
            continue  # lists and preformatted text
        doc = " ".join(" ".join(line.strip() for line in lines if line.strip() != ".").split())
        sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", doc)
        if not (2 <= len(sentences) <= 6 and 200 <= len(doc) <= 900) or len(synopsis.split()) < 4:
            continue
        if any(word in doc.lower() for word in ("transitional", "dummy package", "metapackage")):
            continue
        keys = (doc[:80].lower(), " ".join(synopsis.lower().split()[:3]))
        if any(k in seen for k in keys):
            continue
        seen.update(keys)
        yield {"text": doc, "summary": synopsis}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("translations", help="an uncompressed apt Translation-en file")
    parser.add_argument("out", help="JSONL file to write")
    parser.add_argument("--n", type=int, default=400, help="pairs to keep, a seeded random sample (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.translations, encoding="utf-8") as f:
        found = list(pairs(f.read()))
    random.Random(args.seed).shuffle(found)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in found[: args.n])
    print(f"{len(found)} pairs found; {min(args.n, len(found))} written to {args.out}")


if __name__ == "__main__":
    main()
