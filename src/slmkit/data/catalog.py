"""The datasets slmkit knows by name: where each lives on the Hugging Face Hub, and the one file layout it
has in a data folder (the user's, or slmkit's cache). Data, not code: a new dataset is one more entry."""

from __future__ import annotations

from dataclasses import dataclass

from slmkit.errors import SlmkitError


@dataclass(frozen=True)
class DataFile:
    """One split of a dataset as a file: `path` is relative to a data folder (and to slmkit's cache)."""

    split: str
    path: str
    rows: int  # rows (JSON lines) or lines (raw text) of the full split
    sha256: str | None = None  # of the packaged copy, which is shipped inside slmkit (None: not packaged)


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    hub: str | None  # Hugging Face Hub dataset repository (None: shipped inside slmkit only)
    hub_config: str | None
    files: tuple[DataFile, ...]
    license: str
    text_field: str | None = None  # set for raw-text corpora: the Hub rows' field, written joined as one text file

    def file(self, split: str | None = None) -> DataFile:
        """The file of `split` (default: the first, the one evaluation uses)."""
        if split is None:
            return self.files[0]
        for f in self.files:
            if f.split == split:
                return f
        raise SlmkitError(f"dataset {self.name!r} has no split {split!r}", f"Splits: {', '.join(f.split for f in self.files)}")


def _jsonl(name: str, split: str, rows: int) -> DataFile:
    return DataFile(split, f"{name}/{split}.jsonl", rows)


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("wikitext2", "WikiText-2 (raw) test split", "Salesforce/wikitext", "wikitext-2-raw-v1",
            (DataFile("test", "wikitext2/wiki.test.raw", 4358,
                      "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),),
            "CC BY-SA 3.0", text_field="text"),
    # The packaged ARC files are llm-foundry's layout ({query, choices, gold}); a Hub fetch writes the Hub's schema
    # to the same path. The task readers take either.
    # calibration text for pruning and quantization when none is given: public domain, not an evaluation set
    Dataset("calibration", "The first 160 KB of Charles Dickens' Oliver Twist (1839), public domain", None, None,
            (DataFile("sample", "calibration/novel_sample.txt", 2632,
                      "abdb4eff2a7ae88b5179557c3f61b3b8bf5a01552e4346876742066a5ced0f65"),), "public domain"),
    Dataset("arc_easy", "AI2 ARC-Easy test split", "allenai/ai2_arc", "ARC-Easy",
            (DataFile("test", "arc/arc_easy_test.jsonl", 2376,
                      "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5"),), "CC BY-SA 4.0"),
    Dataset("arc_challenge", "AI2 ARC-Challenge test split", "allenai/ai2_arc", "ARC-Challenge",
            (DataFile("test", "arc/arc_challenge_test.jsonl", 1172,
                      "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636"),), "CC BY-SA 4.0"),
    Dataset("hellaswag", "HellaSwag validation split", "Rowan/hellaswag", None,
            (_jsonl("hellaswag", "validation", 10042),), "MIT"),
    Dataset("piqa", "PIQA validation split", "baber/piqa", None, (_jsonl("piqa", "validation", 1838),), "AFL-3.0"),
    Dataset("winogrande", "WinoGrande (xl) validation split", "allenai/winogrande", "winogrande_xl",
            (_jsonl("winogrande", "validation", 1267),), "CC BY 4.0"),
    Dataset("openbookqa", "OpenBookQA (main) test split", "allenai/openbookqa", "main",
            (_jsonl("openbookqa", "test", 500),), "Apache-2.0"),
    Dataset("boolq", "BoolQ (SuperGLUE) validation split", "aps/super_glue", "boolq",
            (_jsonl("boolq", "validation", 3270),), "CC BY-SA 3.0"),
    Dataset("sciq", "SciQ test split", "allenai/sciq", None, (_jsonl("sciq", "test", 1000),), "CC BY-NC 3.0"),
    Dataset("lambada_openai", "LAMBADA (OpenAI's version) test split", "EleutherAI/lambada_openai", "default",
            (_jsonl("lambada_openai", "test", 5153),), "MIT"),
    Dataset("mmlu", "MMLU, all 57 subjects: test split and the dev split (few-shot examples)", "cais/mmlu", "all",
            (_jsonl("mmlu", "test", 14042), _jsonl("mmlu", "dev", 285)), "MIT"),
)}


def get_dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise SlmkitError(f"no dataset named {name!r}", f"Known datasets: {', '.join(DATASETS)}") from None
