"""A Hugging Face hub on loopback: the part of the hub API that `datasets` streaming calls.

`LoopbackHub(root)` serves dataset repos from folders `root/<owner>/<name>/` (each laid out as the
real repo is, see `layouts.py`) on 127.0.0.1 in a thread. With `HF_ENDPOINT` pointed at `hub.url`,
`datasets.load_dataset(repo, name, split=..., streaming=True)` runs unchanged against it. The routes
are the ones the real libraries were seen to call (`hub.log` records every request):

    GET  /api/datasets/{repo}[/revision/{rev}]        repo info: sha, siblings, cardData
    GET  /api/datasets/{repo}/tree/{rev}[/{path}]     listing (?recursive=true)
    POST /api/datasets/{repo}/paths-info/{rev}        info of given paths
    HEAD/GET /datasets/{repo}/resolve/{rev}/{path}    file bytes, with Range, ETag, X-Repo-Commit

Errors carry the hub's `X-Error-Code` header (RepoNotFound, GatedRepo, EntryNotFound,
RevisionNotFound), which is what huggingface_hub turns into its exception classes.

Faults are set per test on `hub.faults` (a `Faults`): answer 5xx, drop the connection partway through
a file, answer slowly, or refuse a repo as gated. Each fault matches a substring of the request path
and fires a given number of times, so a retry that comes back finds a healthy hub.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

REVISION = "main"


@dataclass
class Fault:
    match: str  # a substring of the request path
    times: int  # how many matching requests it hits; then it is spent
    method: str = "GET"  # "GET", "HEAD" or "*"
    skip: int = 0  # matching requests let through before it fires

    def hits(self, method: str, path: str) -> bool:
        if self.times <= 0 or self.match not in path or self.method not in ("*", method):
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        self.times -= 1
        return True


@dataclass
class Faults:
    status: list[tuple[Fault, int]] = field(default_factory=list)  # answer this status instead
    drop: list[tuple[Fault, int]] = field(default_factory=list)  # send this many body bytes, then close
    slow: list[tuple[Fault, float]] = field(default_factory=list)  # wait this long before answering
    gated: set[str] = field(default_factory=set)  # repo ids that answer 401 GatedRepo
    missing: set[str] = field(default_factory=set)  # repo ids that answer 404 RepoNotFound

    def fail_status(self, match: str, code: int, times: int = 1, method: str = "GET", skip: int = 0) -> None:
        self.status.append((Fault(match, times, method, skip), code))

    def drop_after(self, match: str, n_bytes: int, times: int = 1) -> None:
        self.drop.append((Fault(match, times), n_bytes))

    def delay(self, match: str, seconds: float, times: int = 1, method: str = "*") -> None:
        self.slow.append((Fault(match, times, method), seconds))

    def first(self, kind: list, method: str, path: str):
        with _FAULT_LOCK:
            return next((value for fault, value in kind if fault.hits(method, path)), None)


_FAULT_LOCK = threading.Lock()


@dataclass
class Repo:
    repo_id: str
    folder: Path
    sha: str
    files: dict[str, Path]  # repo path -> file

    @classmethod
    def scan(cls, repo_id: str, folder: Path) -> "Repo":
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        h = hashlib.sha1()
        for name, p in files.items():
            h.update(name.encode() + b"\0" + p.read_bytes())
        return cls(repo_id, folder, h.hexdigest(), files)


def blob_oid(data: bytes) -> str:
    """Git's blob id, the `oid` (and ETag) the hub gives a file stored in git."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entry(repo: Repo, path: str) -> dict | None:
    if path in repo.files:
        data = repo.files[path].read_bytes()
        entry = {"type": "file", "oid": blob_oid(data), "size": len(data), "path": path}
        if path.endswith(".parquet"):  # parquet lives in LFS on the hub: the lfs entry carries its sha256
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry
    if any(f.startswith(path.rstrip("/") + "/") for f in repo.files) or path in ("", "."):
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that gave up (a read timeout the test provoked) leaves a broken pipe: not an error here.
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class LoopbackHub:
    """`with LoopbackHub(root) as hub:` serves root/<owner>/<name>/ repos at hub.url."""

    def __init__(self, root: Path, port: int = 0):
        self.root = Path(root)
        self.faults = Faults()
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._log_lock = threading.Lock()
        self._repos: dict[str, Repo] = {}
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = _Server(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def repo(self, repo_id: str) -> Repo | None:
        folder = self.root / repo_id
        if not (folder / "README.md").is_file():
            return None
        if repo_id not in self._repos:
            self._repos[repo_id] = Repo.scan(repo_id, folder)
        return self._repos[repo_id]

    def rescan(self) -> None:
        """Forget the scanned repos (after a test changed a file)."""
        self._repos.clear()

    def record(self, method: str, path: str, rng: str | None) -> None:
        with self._log_lock:
            self.log.append((method, path, rng))

    def requests(self, match: str = "") -> list[tuple[str, str, str | None]]:
        with self._log_lock:
            return [r for r in self.log if match in r[1]]


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub serves: clients reuse connections

    def log_message(self, *args) -> None:  # the hub's log is hub.log, not stderr
        pass

    # --- dispatch -----------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        body = b""
        if method == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.hub.record(method, path, self.headers.get("Range"))
        faults = self.hub.faults
        wait = faults.first(faults.slow, method, path)
        if wait:
            time.sleep(wait)
        code = faults.first(faults.status, method, path)
        if code:
            return self._error(code, "ServerError" if code >= 500 else None, f"injected {code}")
        parts = path.strip("/").split("/")
        if len(parts) >= 4 and parts[:2] == ["api", "datasets"]:
            return self._api(method, parts[2] + "/" + parts[3], parts[4:], parse_qs(url.query), body)
        if len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
            return self._resolve(method, parts[1] + "/" + parts[2], parts[4], "/".join(parts[5:]))
        self._error(404, None, "not a route of the loopback hub")

    # --- answers ------------------------------------------------------------------------------------

    def _send(self, code: int, body: bytes, headers: dict[str, str], send_body: bool = True) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _json(self, value, method: str = "GET", headers: dict | None = None) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})},
                   method != "HEAD")

    def _error(self, code: int, error_code: str | None, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send(code, json.dumps({"error": message}).encode(), headers, self.command != "HEAD")

    def _find(self, repo_id: str, rev: str) -> Repo | None:
        """The repo at `rev`, or None after answering the error the hub gives."""
        if repo_id in self.hub.faults.gated:
            self._error(401, "GatedRepo", f"Access to dataset {repo_id} is restricted. You must have access "
                                          "to it and be authenticated to access it. Please log in.")
            return None
        repo = None if repo_id in self.hub.faults.missing else self.hub.repo(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if rev not in (REVISION, repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo

    def _api(self, method: str, repo_id: str, rest: list[str], query: dict, body: bytes) -> None:
        rev = rest[1] if len(rest) >= 2 else REVISION
        repo = self._find(repo_id, rev)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            return self._json({"id": repo_id, "_id": repo.sha[:24], "sha": repo.sha, "private": False,
                               "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                               "lastModified": "2026-12-01T00:00:00.000Z",
                               "siblings": [{"rfilename": f} for f in repo.files]}, method)
        if rest[0] == "tree":
            prefix = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(self._tree(repo, prefix, recursive), method)
        if rest[0] == "paths-info" and method == "POST":
            paths = self._paths(body)
            return self._json([e for p in paths if (e := _entry(repo, p.strip("/"))) is not None], method)
        self._error(404, None, f"not a route of the loopback hub: {'/'.join(rest)}")

    def _paths(self, body: bytes) -> list[str]:
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            return list(json.loads(body or b"{}").get("paths", []))
        return [p for k, vs in parse_qs(body.decode()).items() if k in ("paths", "paths[]") for p in vs]

    @staticmethod
    def _tree(repo: Repo, prefix: str, recursive: bool) -> list[dict]:
        under = [f for f in repo.files if not prefix or f.startswith(prefix + "/")]
        names: dict[str, None] = {}
        for f in under:
            rel = f[len(prefix) + 1:] if prefix else f
            head = rel.split("/")
            if recursive:
                for i in range(1, len(head)):
                    names["/".join(([prefix] if prefix else []) + head[:i])] = None
                names[f] = None
            else:
                names["/".join(([prefix] if prefix else []) + head[:1])] = None
        return [e for n in sorted(names) if (e := _entry(repo, n)) is not None]

    def _resolve(self, method: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._find(repo_id, rev)
        if repo is None:
            return
        if path not in repo.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        data = repo.files[path].read_bytes()
        headers = {"ETag": f'"{blob_oid(data)}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "Content-Disposition": f'inline; filename="{path}"'}
        code, body = 200, data
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].partition("-")
            if start_s == "":  # a suffix range: the last N bytes
                start, end = max(len(data) - int(end_s), 0), len(data) - 1
            else:
                start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, False)
            code, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if method == "HEAD":
            return self._send(code, body, headers, send_body=False)
        cut = self.hub.faults.first(self.hub.faults.drop, method, "/" + "/".join(["datasets", repo_id, "resolve",
                                                                                    rev, path]))
        if cut is not None and cut < len(body):
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(code, body, headers)
