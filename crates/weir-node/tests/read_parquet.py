#!/usr/bin/env python3
"""Reads back what a `parquet` output of receiver-node wrote, as a reader of the data would:
only batch directories that hold `_SUCCESS`, and in them the files `_SUCCESS` lists.

    read_parquet.py local <root directory>
    read_parquet.py s3 <endpoint> <bucket> <prefix> <access key> <secret key> <region>

Prints one JSON object:
    {"batches": [{"dir", "marker", "present"}], "incomplete": [dir, ...],
     "schema": {column: arrow type}, "rows": [{column: value, ..., "_dir": dir}]}
Binary values are decoded as UTF-8 (with replacement), timestamps are ms since the epoch.
"""
import json
import posixpath
import sys

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if hasattr(v, "timestamp"):  # datetime
        return round(v.timestamp() * 1000)
    if isinstance(v, list):  # a map: [(key, value), ...]
        return {k: value(x) for k, x in v}
    return v


def main():
    if sys.argv[1] == "local":
        fs, root = pafs.LocalFileSystem(), sys.argv[2]
    elif sys.argv[1] == "s3":
        endpoint, bucket, prefix, access, secret, region = sys.argv[2:8]
        scheme, host = endpoint.split("://", 1)
        fs = pafs.S3FileSystem(
            access_key=access,
            secret_key=secret,
            region=region,
            endpoint_override=host,
            scheme=scheme,
        )
        root = posixpath.join(bucket, prefix) if prefix else bucket
    else:
        raise SystemExit(__doc__)

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    dirs = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            dirs.setdefault(posixpath.dirname(i.path), []).append(posixpath.basename(i.path))

    out = {"batches": [], "incomplete": [], "schema": {}, "rows": []}
    for d, names in sorted(dirs.items()):
        if not posixpath.basename(d).startswith("batch="):
            continue
        rel = posixpath.relpath(d, root)
        if "_SUCCESS" not in names:
            out["incomplete"].append(rel)
            continue
        with fs.open_input_file(posixpath.join(d, "_SUCCESS")) as f:
            marker = json.loads(f.read())
        out["batches"].append({"dir": rel, "marker": marker, "present": sorted(names)})
        for name in marker["files"]:
            with fs.open_input_file(posixpath.join(d, name)) as f:
                table = pq.ParquetFile(f).read()
            for field in table.schema:
                out["schema"][field.name] = str(field.type)
            for row in table.to_pylist():
                r = {k: value(v) for k, v in row.items()}
                r["_dir"] = rel
                out["rows"].append(r)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
