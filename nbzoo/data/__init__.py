"""Data: downloads, and one module per on-disk format of the seeds (reader, writer, sample generator)."""

from nbzoo.data.download import DownloadError, download, extract_zip, sha256_of

__all__ = ["DownloadError", "download", "extract_zip", "sha256_of"]
