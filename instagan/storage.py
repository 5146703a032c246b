"""Local paths and storage URIs (s3://, gs://, ... through pyarrow.fs) behind one pair of calls.

    fs, path = filesystem("s3://bucket/runs/x")     # or a local folder, made absolute
    write_text("s3://bucket/runs/x/config.json", text)
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def filesystem(uri_or_path: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) of a URI or a local path (expanded and made absolute)."""
    if "://" in uri_or_path:
        return pafs.FileSystem.from_uri(uri_or_path)
    return pafs.LocalFileSystem(), str(Path(uri_or_path).expanduser().resolve())


def write_text(uri_or_path: str, text: str) -> None:
    """Write a small text file (its folder created if missing) to a local path or a storage URI."""
    fs, path = filesystem(uri_or_path)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
