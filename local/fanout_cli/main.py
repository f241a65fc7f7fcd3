"""`fanout jobs ...`: submit a JSON Lines file of /batch request items, follow it, fetch its results.

    fanout jobs submit items.jsonl --wait     upload, submit, and show progress until it ends
    fanout jobs status ID                     the job's status as JSON
    fanout jobs results ID -o out.jsonl       every result, in input order, in one file
    fanout jobs cancel ID                     start no more of its chunks

It talks to `make run` (http://127.0.0.1:3000) unless given `--api URL`; a deployed
API (`https://....execute-api.REGION.amazonaws.com/`) is called with SigV4 signatures
from the default AWS credentials, or with `--token` for AuthMode=JWT. Files go to S3
and come back from it by presigned URLs: the API never carries a job's items.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

from tqdm import tqdm

DEFAULT_API = "http://127.0.0.1:3000"
POLL_S = 1.0
ENDED = ("succeeded", "failed", "cancelled")


class ApiError(SystemExit):
    def __init__(self, status: int, body: str, what: str) -> None:
        try:
            detail: Any = json.loads(body).get("detail", body)
        except (ValueError, AttributeError):
            detail = body
        if isinstance(detail, list):  # a 422: one line per field
            detail = "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in detail)
        super().__init__(f"fanout: {what} failed ({status}): {detail}")


class Api:
    """The jobs routes of one API, signed when it is a deployed one with IAM auth."""

    def __init__(self, base: str, *, token: str | None = None, sign: bool | None = None) -> None:
        self.base = base.rstrip("/") + "/"
        self.token = token
        host = urlsplit(self.base).hostname or ""
        self.sign = (host.endswith(".amazonaws.com") and token is None) if sign is None else sign
        self.region = host.split(".")[2] if self.sign and host.count(".") >= 4 else os.environ.get("AWS_REGION")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        url = urljoin(self.base, path.lstrip("/"))
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if self.sign:
            headers = self._signed(method, url, data, headers)
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, exc.read().decode(errors="replace"), f"{method} {path}") from exc
        except urllib.error.URLError as exc:
            raise SystemExit(f"fanout: cannot reach {self.base} ({exc.reason}); is `make run` running?") from exc

    def _signed(self, method: str, url: str, data: bytes | None, headers: dict[str, str]) -> dict[str, str]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.session import Session

        credentials = Session().get_credentials()
        if credentials is None:
            raise SystemExit("fanout: the API wants SigV4 signatures and no AWS credentials were found")
        request = AWSRequest(method=method, url=url, data=data, headers=headers)
        SigV4Auth(credentials, "execute-api", self.region or "us-east-1").add_auth(request)
        return dict(request.headers.items())


def upload(url: str, path: Path) -> None:
    """PUT a file to a presigned URL, streamed (a file of any size costs a block of memory)."""
    size = path.stat().st_size
    with path.open("rb") as file, tqdm(total=size, unit="B", unit_scale=True, desc="upload", leave=False) as bar:
        reader = _Progress(file, bar)
        headers = {"content-length": str(size), "content-type": "application/x-ndjson"}  # not a form: S3 keeps it
        request = urllib.request.Request(url, data=reader, method="PUT", headers=headers)  # type: ignore[arg-type]
        with urllib.request.urlopen(request, timeout=600) as answer:
            answer.read()


class _Progress:
    """A file that moves a progress bar as it is read."""

    def __init__(self, file: IO[bytes], bar: tqdm) -> None:  # type: ignore[type-arg]
        self.file, self.bar = file, bar

    def read(self, size: int = -1) -> bytes:
        block = self.file.read(size)
        self.bar.update(len(block))
        return block


def submit(api: Api, path: Path, *, concurrency: int | None, targets: dict[str, Any]) -> str:
    slot = api.call("POST", "jobs/uploads")
    if path.stat().st_size > slot["max_bytes"]:
        raise SystemExit(f"fanout: {path} is {path.stat().st_size} bytes; the API takes at most {slot['max_bytes']}")
    upload(slot["upload_url"], path)
    body: dict[str, Any] = {"upload_id": slot["upload_id"]}
    if concurrency:
        body["concurrency"] = concurrency
    if targets:
        body["targets"] = targets
    return str(api.call("POST", "jobs", body)["job_id"])


def wait(api: Api, job_id: str) -> dict[str, Any]:
    """Poll until the job ends, with a progress bar of its items."""
    with tqdm(total=None, unit="item", desc=job_id[:8]) as bar:
        while True:
            job = api.call("GET", f"jobs/{job_id}")
            if job.get("total") is not None and bar.total != job["total"]:
                bar.total = job["total"]
                bar.refresh()
            done = job["succeeded"] + job["failed"] + job["skipped"]
            bar.update(done - bar.n)
            bar.set_postfix(status=job["status"], failed=job["failed"], refresh=False)
            if job["status"] in ENDED and job.get("finished_at"):
                return dict(job)
            time.sleep(POLL_S)


def results(api: Api, job_id: str, out: IO[bytes]) -> int:
    """Write every results file, in order, into `out`; the number of files."""
    job = api.call("GET", f"jobs/{job_id}")
    if "results" not in job:
        raise SystemExit(f"fanout: job {job_id} is {job['status']}; its results are ready when it has ended")
    files = 0
    page: str | None = job["results"]["first_page"]
    with tqdm(total=job.get("chunks") or 0, unit="file", desc="results") as bar:
        while page:
            answer = api.call("GET", page)
            for url in answer["urls"]:
                with urllib.request.urlopen(url, timeout=300) as body:
                    shutil.copyfileobj(body, out)
                files += 1
                bar.update(1)
            page = answer["next_page"]
    return files


def _targets(values: list[str]) -> dict[str, Any]:
    """--rate name=50 -> {"name": {"rate_per_s": 50.0}}."""
    found: dict[str, Any] = {}
    for value in values:
        name, _, rate = value.partition("=")
        try:
            found.setdefault(name, {})["rate_per_s"] = float(rate)
        except ValueError:
            raise SystemExit(f"fanout: --rate wants NAME=REQUESTS_PER_SECOND, got {value!r}") from None
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fanout", description=__doc__.splitlines()[0])
    parser.add_argument("--api", default=os.environ.get("FANOUT_API", DEFAULT_API), help=f"default {DEFAULT_API}")
    parser.add_argument("--token", default=os.environ.get("FANOUT_TOKEN"), help="a JWT, for AuthMode=JWT")
    commands = parser.add_subparsers(dest="group", required=True)
    jobs = commands.add_parser("jobs", help="jobs far beyond one call").add_subparsers(dest="command", required=True)
    submitting = jobs.add_parser("submit", help="upload a JSON Lines file of items and submit it")
    submitting.add_argument("file", type=Path)
    submitting.add_argument("--wait", action="store_true", help="follow it until it ends")
    submitting.add_argument("--concurrency", type=int, help="requests in flight per worker")
    submitting.add_argument("--rate", action="append", default=[], metavar="NAME=R", help="a target's job-wide rate")
    for name, text in (("status", "the job's status"), ("cancel", "start no more of its chunks")):
        jobs.add_parser(name, help=text).add_argument("job_id")
    fetching = jobs.add_parser("results", help="every result in one JSON Lines file")
    fetching.add_argument("job_id")
    fetching.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    api = Api(args.api, token=args.token)

    if args.command == "submit":
        if not args.file.is_file():
            raise SystemExit(f"fanout: no file {args.file}")
        job_id = submit(api, args.file, concurrency=args.concurrency, targets=_targets(args.rate))
        print(job_id, flush=True)
        if args.wait:
            job = wait(api, job_id)
            print(json.dumps({k: job[k] for k in ("status", "total", "succeeded", "failed", "skipped")}))
            if job["status"] != "succeeded":
                sys.exit(1)
    elif args.command == "status":
        print(json.dumps(api.call("GET", f"jobs/{args.job_id}"), indent=2))
    elif args.command == "cancel":
        print(json.dumps(api.call("DELETE", f"jobs/{args.job_id}")))
    else:
        with args.output.open("wb") as out:
            files = results(api, args.job_id, out)
        print(f"{files} results files into {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
