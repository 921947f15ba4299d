"""A local stand-in for the parts of the Hugging Face Hub HTTP API that an upload uses
(create repo, preupload, commit), so the real huggingface_hub client can be tested offline."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HubStub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self) -> None:
                stub.requests.append(("POST", self.path, dict(self.headers)))
                body = self._body()
                if self.path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data.get('organization') or 'me'}/{data['name']}"
                    if repo in stub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": self.url(repo)})
                    private = bool(data.get("private")) or data.get("visibility") == "private"
                    stub.repos[repo] = {"private": private, "files": {}, "request": data}
                    return self._reply(200, {"url": self.url(repo)})
                if self.path == "/api/validate-yaml":  # the model card's metadata header
                    return self._reply(200, stub.validate_card(json.loads(body)["content"]))
                parts = self.path.split("/")  # /api/models/{owner}/{name}/{preupload|commit}/{revision}
                repo = "/".join(parts[3:5])
                if repo not in stub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                if parts[5] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if parts[5] == "commit":
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            stub.repos[repo]["files"][value["path"]] = base64.b64decode(value["content"])
                    return self._reply(200, {"commitUrl": f"{self.url(repo)}/commit/1", "commitOid": "1" * 40,
                                             "success": True})
                return self._reply(404, {"error": "unknown endpoint"})

            def url(self, repo: str) -> str:
                return f"http://{self.headers['Host']}/{repo}"

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def validate_card(content: str) -> dict[str, Any]:
        """As the Hub does: the front matter must be a YAML mapping."""
        import yaml

        errors = []
        if content.startswith("---\n"):
            try:
                header = yaml.safe_load(content.split("---\n")[1])
                if not isinstance(header, dict):
                    errors.append({"message": "metadata is not a mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": str(exc)})
        return {"errors": errors, "warnings": []}

    def __enter__(self) -> HubStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
