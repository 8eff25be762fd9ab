"""Downloading a public evaluation file (HellaSwag's JSONL, the CORE eval bundle) over HTTP:
streamed into an open file with a progress bar, with a body that stops short said as such.
The callers cache the result and move it into place atomically."""

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from errors import UserError, one_line


def download(url, out, local_copy_hint):
    """Stream `url` into the open binary file `out`. `local_copy_hint` names how to pass a local
    copy instead (e.g. "--data, or train.json's hellaswag_data"), for the error line."""
    print(f"downloading {url}", file=sys.stderr)
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc="download") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as e:  # urllib's errors are OSErrors
        raise UserError(f"could not download {url} ({one_line(e)}); use a local copy ({local_copy_hint})")
    # http.client ends a body that stops short of its Content-Length without an error.
    if size is not None and received != size:
        raise UserError(f"could not download {url}: the connection closed after {received:,} of {size:,} bytes; "
                        f"try again, or use a local copy ({local_copy_hint})")


def cache_path(url, cache_dir):
    """Where `url`'s copy lives in `cache_dir`: the name carries a hash of the URL, so two
    URLs never share a copy."""
    url_hash = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{url_hash}-{Path(urllib.parse.urlparse(url).path).name}"


def cached_download(url, cache_dir, local_copy_hint, check):
    """The local copy of `url` in `cache_dir`, downloaded on first use.

    The download goes to a temporary file that is renamed into place only once it is
    complete and `check(path)` accepts it (it raises UserError otherwise), so an
    interrupted download or an error page is never taken for the data."""
    cached = cache_path(url, cache_dir)
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=cached.parent, prefix=cached.name + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            download(url, out, local_copy_hint)
        check(partial)
        os.replace(partial, cached)
    finally:
        Path(partial).unlink(missing_ok=True)
    return cached
