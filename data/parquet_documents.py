"""Reading documents from a Parquet text column with pyarrow, one record batch at a time, never a whole file."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data.documents import Documents

# Rows per record batch: pyarrow holds the row group being read, we hold one batch of its strings.
PARQUET_BATCH_ROWS = 1024

# pyarrow reports a corrupt or non-Parquet file as ArrowInvalid or an OSError, depending on where it notices.
_READ_ERRORS = (pa.ArrowException, OSError)


def check_parquet_files(files: list[Path], text_column: str) -> None:
    """Every file opens as Parquet and has a string ``text_column``: checked from the footers, before any reading."""
    for file in files:
        try:
            with pq.ParquetFile(file) as parquet:
                schema, num_rows = parquet.schema_arrow, parquet.metadata.num_rows
        except _READ_ERRORS as err:
            raise ValueError(
                f"{file}: not a readable Parquet file ({_first_line(err)}); replace it or remove it"
            ) from None
        if text_column not in schema.names:
            raise ValueError(
                f"{file}: no column {text_column!r} (it has {', '.join(schema.names)}); "
                "set dataset_text_column (--text_column for scripts.pretokenize) to the column holding the text"
            )
        column_type = schema.field(text_column).type
        if not (
            pa.types.is_string(column_type)
            or pa.types.is_large_string(column_type)
            or pa.types.is_string_view(column_type)
        ):
            raise ValueError(
                f"{file}: column {text_column!r} holds {column_type}, not strings; "
                "set dataset_text_column (--text_column for scripts.pretokenize) to the column holding the text"
            )
        if num_rows == 0:
            raise ValueError(f"{file}: empty file (no rows); remove it or fill it")


def parquet_file_documents(path: Path, text_column: str) -> Documents:
    """Each row's ``text_column`` string, with the bytes read so far estimated as the file's share of rows read."""
    size = path.stat().st_size
    row = 0
    try:
        with pq.ParquetFile(path) as parquet:
            num_rows = parquet.metadata.num_rows
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_column]):
                for text in batch.column(0).to_pylist():
                    if text is None:
                        raise ValueError(
                            f"{path}: row {row} of column {text_column!r} is null; drop or fill the rows without text"
                        )
                    row += 1
                    yield text, size * row // num_rows
    except _READ_ERRORS as err:
        raise ValueError(
            f"{path}: corrupt Parquet data after row {row} ({_first_line(err)}); replace the file"
        ) from None


def _first_line(err: Exception) -> str:
    return str(err).strip().split("\n")[0]
