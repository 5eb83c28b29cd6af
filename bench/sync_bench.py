#!/usr/bin/env python3
"""Helpers of bench/sync-compare.sh: fill and change an S3 bucket laid out like a Stella Ops
export, count the requests in moto's request log, and print the results as a markdown table.

Subcommands:
  fill ENDPOINT BUCKET PREFIX OBJECTS LARGE      create the bucket and upload the export
  change ENDPOINT BUCKET PREFIX OBJECTS COUNT    rewrite COUNT objects with new content
  check DIR OBJECTS LARGE COUNT                  print how many files of DIR are wrong
  count LOG SKIP BUCKET                          count the requests after line SKIP of LOG
  table RESULTS                                  print the TSV rows of RESULTS as a table

`fill` and `change` need boto3 (moto's virtual environment has it); the others need only the
standard library. Content is deterministic for given OBJECTS, LARGE and COUNT, so `check`
rebuilds the expected export instead of downloading it.
"""

import concurrent.futures
import hashlib
import json
import pathlib
import random
import re
import sys

DOMAINS = ["primary", "community", "vendor-a", "vendor-b", "vendor-c"]
FORMATS = [("json", "json"), ("jsonl", "jsonl"), ("openvex", "openvex.json"), ("csaf", "csaf.json")]
GENERATED = "2026-12-02T00:00:00Z"
CHANGED = "2026-12-02T00:05:00Z"
# Files of the export besides the small export documents: two root documents, and per domain
# a manifest, a bundle, its signature and an index.
FIXED_FILES = 2 + 4 * len(DOMAINS)
UPLOAD_THREADS = 8


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    command, args = argv[1], argv[2:]
    handlers = {"fill": fill, "change": change, "check": check, "count": count, "table": table}
    if command not in handlers:
        sys.exit(f"sync_bench.py: unknown subcommand {command!r}\n{__doc__}")
    handlers[command](*args)


def client(endpoint):
    import boto3  # only fill and change need it

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def export_keys(objects):
    """Returns (domain, export key, format, suffix) of each small export document."""
    small = objects - FIXED_FILES
    if small < len(DOMAINS):
        sys.exit(f"sync_bench.py: at least {FIXED_FILES + len(DOMAINS)} objects are needed")
    keys = []
    for i in range(small):
        domain = DOMAINS[i % len(DOMAINS)]
        number = i // len(DOMAINS)
        name, suffix = FORMATS[number % len(FORMATS)]
        keys.append((domain, f"export-{number // len(FORMATS):05d}", name, suffix))
    return keys


def export_document(domain, export_key, fmt, nonce, claims):
    """Returns a VEX-like export document of about 1 to 4 KB; `nonce` is 16 hex digits."""
    statements = [
        {
            "vulnerabilityId": f"SAMPLE-{domain.upper()}-{n:06d}",
            "productKey": f"pkg:npm/sample-lib-{n}@1.{n % 10}.0",
            "status": ["not_affected", "affected", "fixed", "under_investigation"][n % 4],
        }
        for n in range(claims)
    ]
    document = {
        "schemaVersion": 1,
        "exportKey": export_key,
        "domainId": domain,
        "format": fmt,
        "generatedAt": GENERATED,
        "nonce": nonce,
        "claims": statements,
    }
    return json.dumps(document, indent=1).encode()


def bundle(domain, size, rng):
    """Returns an advisory bundle of about `size` bytes, one advisory a line."""
    lines = []
    total = 0
    n = 0
    while total < size:
        line = json.dumps(
            {
                "advisoryKey": f"SAMPLE-{domain.upper()}-{n:07d}",
                "summary": rng.randbytes(48).hex(),
                "modified": GENERATED,
            }
        )
        lines.append(line)
        total += len(line) + 2
        n += 1
    head = json.dumps({"kind": "concelier.advisory-bundle", "domainId": domain})
    return (head[:-1] + ', "advisories": [\n' + ",\n".join(lines) + "\n]}\n").encode()


def digest(data):
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def domain_index(domain, entries, generated):
    exports = [
        {"exportKey": key, "format": fmt, "path": f"exports/{key}.{suffix}", **digest(data)}
        for (key, fmt, suffix, data) in entries
    ]
    document = {
        "schemaVersion": 1,
        "kind": "excititor.mirror-domain-index",
        "domainId": domain,
        "generatedAt": generated,
        "exports": exports,
    }
    return json.dumps(document, indent=1).encode()


def small_documents(objects):
    """Returns {object key: content} of the small export documents."""
    rng = random.Random(objects)
    documents = {}
    for domain, key, fmt, suffix in export_keys(objects):
        nonce = rng.randbytes(8).hex()
        data = export_document(domain, key, fmt, nonce, rng.randint(6, 30))
        documents[f"mirror/{domain}/exports/{key}.{suffix}"] = data
    return documents


def indexes(documents, generated):
    """Returns {object key: content} of every domain's index.json over `documents`."""
    out = {}
    for domain in DOMAINS:
        entries = []
        for path, data in sorted(documents.items()):
            parts = path.split("/")
            if parts[1] != domain:
                continue
            key, _, suffix = parts[3].partition(".")
            fmt = next(name for name, s in FORMATS if s == suffix)
            entries.append((key, fmt, suffix, data))
        out[f"mirror/{domain}/index.json"] = domain_index(domain, entries, generated)
    return out


def export_files(objects, large):
    """Returns {key under the prefix: content} of the whole export, before any change."""
    if large > len(DOMAINS):
        sys.exit(f"sync_bench.py: at most {len(DOMAINS)} large objects (one bundle a domain)")
    rng = random.Random(objects + 1)
    files = small_documents(objects)
    files.update(indexes(files, GENERATED))
    summary = []
    for i, domain in enumerate(DOMAINS):
        # The first `large` bundles are 8 to 20 MB; the others are small.
        size = rng.randint(8, 20) * 1024 * 1024 if i < large else rng.randint(2048, 4096)
        data = bundle(domain, size, rng)
        files[f"mirror/{domain}/bundle.json"] = data
        files[f"mirror/{domain}/bundle.json.jws"] = rng.randbytes(72).hex().encode()
        manifest = {
            "schemaVersion": 1,
            "kind": "concelier.mirror-manifest",
            "domainId": domain,
            "generatedAt": GENERATED,
            "bundle": {"path": "bundle.json", **digest(data)},
        }
        files[f"mirror/{domain}/manifest.json"] = json.dumps(manifest, indent=1).encode()
        summary.append({"id": domain, "manifest": {"path": f"mirror/{domain}/manifest.json"}})
    root_index = {"kind": "concelier.mirror-index", "generatedAt": GENERATED, "domains": summary}
    files["mirror/index.json"] = json.dumps(root_index, indent=1).encode()
    domains = {"kind": "excititor.mirror-domains", "generatedAt": GENERATED, "domains": DOMAINS}
    files["mirror/domains.json"] = json.dumps(domains, indent=1).encode()
    assert len(files) == objects, (len(files), objects)
    return files


def changed_files(objects, count):
    """Returns {key: new content} of the `count` objects that `change` rewrites: export
    documents spread over every domain (half at the same size), and every domain's index."""
    if count <= len(DOMAINS):
        sys.exit(f"sync_bench.py: change needs a COUNT over {len(DOMAINS)} (the domain indexes)")
    documents = small_documents(objects)
    chosen = sorted(documents)[:: max(1, len(documents) // (count - len(DOMAINS)))]
    chosen = chosen[: count - len(DOMAINS)]
    rng = random.Random(objects + 2)
    changed = {}
    for i, path in enumerate(chosen):
        old = documents[path]
        document = json.loads(old)
        document["generatedAt"] = CHANGED
        document["nonce"] = rng.randbytes(8).hex()
        if i % 2 == 1:
            document["claims"].append(document["claims"][0])
        data = json.dumps(document, indent=1).encode()
        if i % 2 == 0:
            assert len(data) == len(old), path
        changed[path] = data
    documents.update(changed)
    changed.update(indexes(documents, CHANGED))
    assert len(changed) == count, (len(changed), count)
    return changed


def fill(endpoint, bucket, prefix, objects, large):
    files = export_files(int(objects), int(large))
    s3 = client(endpoint)
    s3.create_bucket(Bucket=bucket)
    upload(s3, bucket, prefix, files)
    total = sum(len(data) for data in files.values())
    print(f"uploaded {len(files)} objects, {total / 1e6:.1f} MB, to s3://{bucket}/{prefix}")


def change(endpoint, bucket, prefix, objects, count):
    changed = changed_files(int(objects), int(count))
    upload(client(endpoint), bucket, prefix, changed)
    documents = len(changed) - len(DOMAINS)
    print(
        f"rewrote {len(changed)} objects: {documents} export documents, "
        f"{(documents + 1) // 2} of them at the same size, and {len(DOMAINS)} domain indexes"
    )


def check(directory, objects, large, changed):
    """Prints how many files under `directory` differ from the export: missing, extra or
    with other content. `changed` is the count `change` rewrote, 0 before it ran."""
    expected = export_files(int(objects), int(large))
    if int(changed):
        expected.update(changed_files(int(objects), int(changed)))
    root = pathlib.Path(directory)
    found = {
        str(path.relative_to(root)): path
        for path in root.rglob("*")
        if path.is_file() and not path.name.startswith(".")
    }
    missing = len(set(expected) - set(found))
    extra = len(set(found) - set(expected))
    stale = sum(
        1 for key, path in found.items() if key in expected and path.read_bytes() != expected[key]
    )
    print(missing + extra + stale)


def upload(s3, bucket, prefix, files):
    def put(item):
        key, data = item
        s3.put_object(Bucket=bucket, Key=prefix + key, Body=data)

    with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        for _ in pool.map(put, sorted(files.items())):
            pass


# A request line of moto's (werkzeug's) log, after the ANSI colours are stripped:
# 127.0.0.1 - - [04/Dec/2026 19:27:53] "GET /bucket?list-type=2 HTTP/1.1" 200 -
REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3})')
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def count(log, skip, bucket):
    """Prints the requests after line `skip` of moto's log as list, head, get, other, errors."""
    counts = {"list": 0, "head": 0, "get": 0, "other": 0, "errors": 0}
    with open(log, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f):
            if number < int(skip):
                continue
            match = REQUEST.search(ANSI.sub("", line))
            if not match:
                continue
            method, target, status = match.groups()
            path = target.split("?", 1)[0].rstrip("/")
            if method == "GET" and path == f"/{bucket}":
                counts["list"] += 1
            elif method == "HEAD":
                counts["head"] += 1
            elif method == "GET":
                counts["get"] += 1
            else:
                counts["other"] += 1
            if int(status) >= 400:
                counts["errors"] += 1
    print("\t".join(str(counts[k]) for k in ("list", "head", "get", "other", "errors")))


def table(results):
    """Prints rows `scenario tool seconds list head get other errors rc wrong` as markdown."""
    rows = [line.rstrip("\n").split("\t") for line in open(results, encoding="utf-8")]
    print("| scenario | tool | wall time | requests | LIST | HEAD | GET | other | exit | wrong files |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scenario, tool, seconds, lists, heads, gets, other, errors, rc, wrong in rows:
        total = int(lists) + int(heads) + int(gets) + int(other)
        failed = f" ({errors} failed)" if int(errors) else ""
        print(
            f"| {scenario} | {tool} | {float(seconds):.2f} s | {total}{failed} | {lists} "
            f"| {heads} | {gets} | {other} | {rc} | {wrong} |"
        )


if __name__ == "__main__":
    main(sys.argv)
