"""Batch jobs over image collections: resumable, batched, and scaling out through Ray Data.

``run(model_or_path, inputs, out, ...)`` answers every image of a folder or every row of
a JSONL / CSV file and appends one JSON line per input to ``out``: ``id``, ``image``,
``prompt``, ``answer``, ``points`` (pixels, for pointing answers), ``new_tokens``,
``seconds`` and ``error`` (null, or why the row failed). Running it again with the same
``out`` skips the ids already there. Modules: ``rows`` (inputs), ``results`` (the output
file), ``answer`` (one batch through the model), ``runner`` (``run``), ``scale_out``
(Ray Data actors; needs the ``ray`` extra).
"""

from molmoe_lite.batch.results import FIELDS, ResultsFile, ResultsFileError
from molmoe_lite.batch.rows import DEFAULT_PROMPT, IMAGE_EXTENSIONS, BatchInputError, Row, read_rows
from molmoe_lite.batch.runner import BatchSummary, run

__all__ = ["BatchInputError", "BatchSummary", "DEFAULT_PROMPT", "FIELDS", "IMAGE_EXTENSIONS", "ResultsFile",
           "ResultsFileError", "Row", "read_rows", "run"]
