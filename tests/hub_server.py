"""A fake Hugging Face Hub on 127.0.0.1 for upload tests: no internet, real HTTP.

It answers the part of the Hub API that `huggingface_hub` (2.x) uses for `create_repo` and
`upload_folder`:

- `POST /api/repos/create` -> `{"url": ...}`;
- `POST /api/validate-yaml` (sent when README.md is uploaded) -> `{}`;
- `POST /api/{type}s/{repo_id}/preupload/{revision}` -> every file in "regular" mode, so the client
  sends contents inline (base64) in the commit instead of going through LFS or Xet storage;
- `POST /api/{type}s/{repo_id}/commit/{revision}` (ndjson: a header line, then `file` / `deletedFile` /
  `deletedFolder` lines) -> stores the files under `root/<repo_id>/` and answers `commitUrl` and
  `commitOid`. `commits` lists each commit's summary and the sha256 of each file it wrote.

Faults for tests: `fail_next(count, status)` answers the next `count` requests with that status (a
JSON error body, `Retry-After: 0` on 429), `delay` makes every answer wait, and `stop()` takes the
server down. `requests` records (method, path, authorization header) of every request.
"""

import base64
import hashlib
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    """Start with `FakeHub(root)`; `.url` is the endpoint to give `HfApi(endpoint=...)` or `HF_ENDPOINT`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str, str | None]] = []
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.delay = 0.0
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()

    def repo_path(self, repo_id: str) -> Path:
        """Folder holding the files committed to `repo_id`."""
        return self.root / repo_id

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next `count` requests with HTTP `status`."""
        with self._lock:
            self._failures.extend([status] * count)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling ---------------------------------------------------------------------------

    def _next_failure(self) -> int | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method != "POST":
            return 404, {"error": f"fake Hub: {method} {path} is not implemented"}
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = (
                f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            )
            with self._lock:
                self.repos.setdefault(repo_id, {"private": bool(payload.get("private"))})
            self.repo_path(repo_id).mkdir(parents=True, exist_ok=True)
            return 200, {"url": f"{self.url}/{repo_id}"}
        if path == "/api/validate-yaml":
            return 200, {}
        parts = path.split("/")  # ["", "api", "models", org, name, action, revision]
        if len(parts) == 7 and parts[1] == "api" and parts[2] == "models":
            repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
            if repo_id not in self.repos:
                return 404, {"error": f"Repository Not Found for url: {path}"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]
                }
            if action == "commit":
                return self._commit(repo_id, body)
        return 404, {"error": f"fake Hub: POST {path} is not implemented"}

    def _commit(self, repo_id: str, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        folder = self.repo_path(repo_id)
        written = {}
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            target = folder / value["path"]
            if key == "file":
                target.parent.mkdir(parents=True, exist_ok=True)
                content = base64.b64decode(value["content"])
                target.write_bytes(content)
                written[value["path"]] = hashlib.sha256(content).hexdigest()
            elif key == "deletedFile":
                target.unlink(missing_ok=True)
            elif key == "deletedFolder":
                shutil.rmtree(target, ignore_errors=True)
            else:
                return 400, {"error": f"fake Hub: commit operation {key!r} is not supported (only regular files)"}
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            self.commits.append({"repo_id": repo_id, "summary": header.get("summary"), "files": written, "oid": oid})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = unquote(urlsplit(self.path).path)
            with hub._lock:
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
            if hub.delay:
                time.sleep(hub.delay)
            failure = hub._next_failure()
            if failure is not None:
                status, payload = failure, {"error": f"injected failure {failure}"}
            else:
                status, payload = hub.handle(self.command, path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_GET = do_PUT = _serve

        def log_message(self, format: str, *args) -> None:  # keep test output clean
            pass

    return Handler
