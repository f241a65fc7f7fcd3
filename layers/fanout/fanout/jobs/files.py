"""A job's files in S3: where each is kept, and reading and writing them a bounded piece at a time.

Input bucket: `uploads/{upload_id}.jsonl` (what a caller PUTs to a presigned URL) and
`jobs/{job_id}/items.jsonl` (the items of a job submitted inline). A job only ever
reads keys this module names: a caller chooses an upload id, never a bucket or key.

Results bucket: `results/{job_id}/chunks/{index:07d}.jsonl`, one per chunk, written once
(S3's conditional write, If-None-Match: the first attempt to finish the chunk writes it,
and its counts ride along as the object's metadata, so any later attempt records what
the file holds instead of overwriting it); and `results/{job_id}/manifest.json` once
the job has ended.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any, NamedTuple

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from fanout.jobs.store import ChunkCounts

READ_BLOCK_BYTES = 1 << 20
SPOOL_BYTES = 8 << 20  # a chunk's results file in memory up to this, then on /tmp
_COUNTED = ("succeeded", "failed", "skipped")  # a results file's counts, kept as its metadata


def s3_client() -> Any:
    """boto3's S3 client as the jobs need it. Its presigned URLs are signed with SigV4: boto3 still
    presigns with SigV2 in the older regions, and S3 refuses SigV2 for buckets created since June 2020,
    as `sam deploy` creates them. Virtual-hosted, so a URL names the bucket's region: the global name
    answers a new bucket of another region with a 307 for up to a day. Against an address (moto, locally)
    botocore falls back to path-style."""
    return boto3.client("s3", config=Config(signature_version="s3v4", s3={"addressing_style": "virtual"}))


class Line(NamedTuple):
    """One line of an input file: where it starts, its length without the newline, and its bytes, or
    None if it is longer than the cap (such a line is counted and skipped, never held)."""

    offset: int
    length: int
    data: bytes | None

    @property
    def blank(self) -> bool:
        return self.data is not None and not self.data.strip()


def bounded_lines(blocks: Iterable[bytes], max_line_bytes: int, *, offset: int = 0) -> Iterator[Line]:
    """Blocks of a file in, its lines out (`offset` is where the first block starts in the file).

    What is held at once is a block and at most `max_line_bytes` of a line: past the cap, the
    rest of the line is only counted. The last line may lack its newline."""
    pending, skipped = b"", 0  # the line so far; or, for a line past the cap, how long it is so far
    for block in blocks:
        *whole, tail = (pending + block).split(b"\n")  # pending is empty while a line is skipped
        for piece in whole:
            length = skipped + len(piece)
            yield Line(offset, length, None if skipped or length > max_line_bytes else piece)
            offset += length + 1
            skipped = 0
        if skipped or len(tail) > max_line_bytes:
            skipped, pending = skipped + len(tail), b""
        else:
            pending = tail
    if pending or skipped:
        yield Line(offset, skipped + len(pending), None if skipped else pending)


def upload_key(upload_id: str) -> str:
    return f"uploads/{upload_id}.jsonl"


def inline_key(job_id: str) -> str:
    return f"jobs/{job_id}/items.jsonl"


def results_key(job_id: str, index: int) -> str:
    return f"results/{job_id}/chunks/{index:07d}.jsonl"


def manifest_key(job_id: str) -> str:
    return f"results/{job_id}/manifest.json"


class JobFiles:
    """The two buckets, through one boto3 S3 client."""

    def __init__(self, s3: Any, *, input_bucket: str, results_bucket: str, url_ttl_s: int) -> None:
        self.s3 = s3
        self.input_bucket = input_bucket
        self.results_bucket = results_bucket
        self.url_ttl_s = url_ttl_s

    def __repr__(self) -> str:
        return f"JobFiles(input={self.input_bucket!r}, results={self.results_bucket!r})"

    def upload_url(self, upload_id: str) -> str:
        """A presigned PUT of an upload's file: the only way a caller's file gets into the input bucket."""
        return str(
            self.s3.generate_presigned_url(
                "put_object",
                Params={"Bucket": self.input_bucket, "Key": upload_key(upload_id)},
                ExpiresIn=self.url_ttl_s,
            )
        )

    def input_size(self, key: str) -> int | None:
        """The input file's size in bytes, or None if there is none."""
        try:
            head = self.s3.head_object(Bucket=self.input_bucket, Key=key)
        except self.s3.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"])

    def put_input(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.input_bucket, Key=key, Body=data, ContentType="application/x-ndjson")

    def read_lines(self, key: str, max_line_bytes: int, *, start: int = 0, end: int | None = None) -> Iterator[Line]:
        """The lines of an input file, or of its bytes [start, end) (one chunk's), read a block at a
        time: a file of any size, and a line of any length, costs a block and a line's cap of memory."""
        if end is not None and end <= start:
            return iter(())
        ranged = {} if end is None else {"Range": f"bytes={start}-{end - 1}"}
        body = self.s3.get_object(Bucket=self.input_bucket, Key=key, **ranged)["Body"]
        return bounded_lines(body.iter_chunks(READ_BLOCK_BYTES), max_line_bytes, offset=start)

    def put_results_once(self, key: str, lines: Iterable[str], counts: ChunkCounts) -> ChunkCounts:
        """Write a chunk's results unless its file exists; the counts of the file that stays (ours, or
        those of the attempt that wrote first, with our requests: we did send them).

        The lines are spooled to a temporary file as they come (to disk past SPOOL_BYTES), so a
        chunk's results are never held in memory beside the reports they are made from."""
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            for line in lines:
                spool.write(line.encode("utf-8"))
                spool.write(b"\n")
            spool.seek(0)
            return self._put_once(key, spool, counts)

    def _put_once(self, key: str, body: IO[bytes], counts: ChunkCounts) -> ChunkCounts:
        metadata = {name: str(getattr(counts, name)) for name in _COUNTED}
        try:
            self.s3.put_object(
                Bucket=self.results_bucket,
                Key=key,
                Body=body,
                ContentType="application/x-ndjson",
                Metadata=metadata,
                IfNoneMatch="*",
            )
            return counts
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise  # ConditionalRequestConflict (another write in flight) included: the chunk comes back
        written = self.results_counts(key)
        if written is None:  # pragma: no cover - S3 said it exists a moment ago and results are never deleted early
            raise RuntimeError(f"the results file {key} exists and cannot be read")
        return dataclasses.replace(written, requests=counts.requests, throttled=counts.throttled)

    def results_counts(self, key: str) -> ChunkCounts | None:
        """The counts a chunk's results file was written with, or None if it has not been written."""
        try:
            head = self.s3.head_object(Bucket=self.results_bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        metadata = head.get("Metadata", {})
        return ChunkCounts(**{name: int(metadata.get(name, 0)) for name in _COUNTED})

    def put_manifest(self, job_id: str, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, separators=(",", ":")).encode()
        self.s3.put_object(
            Bucket=self.results_bucket, Key=manifest_key(job_id), Body=data, ContentType="application/json"
        )

    def results_url(self, key: str) -> str:
        """A presigned GET of a results file or the manifest."""
        return str(
            self.s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.results_bucket, "Key": key}, ExpiresIn=self.url_ttl_s
            )
        )
