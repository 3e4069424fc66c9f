"""Data curation of jsonl/parquet datasets: exact and near-duplicate removal, n-gram
decontamination against eval sets, length / language / predicate filters, and statistics.

Every step is a pure function over a list of rows (dicts) that returns the indices of the
rows it keeps and a JSON-able report; `nebula.curation.io` reads and writes the files
(through `datasets`) and `services/cli_data.py` is the `nebula data` command.

* `text`: the text of a row's field, normalisation, word tokens and n-grams.
* `dedup`: exact (normalised-text hash) and near (MinHash LSH) deduplication.
* `decontam`: Tülu 3's 8-gram decontamination against one or more eval sets.
* `filters`: token-length bounds, language id, a user predicate.
* `stats`: rows, length percentiles, duplicates, contamination.
"""

from __future__ import annotations


class CurationError(ValueError):
    """Bad input: the message names the file (and row) at fault."""
