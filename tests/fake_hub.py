"""A loopback HTTP server that answers the Hub API calls of ``create_repo`` + ``upload_folder``
and records what arrives (repos created, commits with their files)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.commits: list[dict] = []
        self.unknown: list[str] = []
        self.validated: list[dict] = []
        self.pull_requests: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    request["authorization"] = self.headers.get("authorization")
                    hub.repos.append(request)
                    name = f"{request.get('organization') or 'user'}/{request['name']}"
                    return self._json(200, {"url": f"http://{self.headers['Host']}/{name}", "name": name, "id": name})
                if path == "/api/validate-yaml":
                    import yaml

                    content = json.loads(body)["content"]
                    try:
                        front = content.split("---")[1]
                        hub.validated.append(yaml.safe_load(front))
                    except (IndexError, yaml.YAMLError) as error:
                        return self._json(400, {"error": f"invalid YAML: {error}"})
                    return self._json(200, {"errors": [], "warnings": []})
                if path.endswith("/discussions"):
                    hub.pull_requests.append(json.loads(body))
                    return self._json(200, {"num": 1, "pullRequest": True})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._json(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                if "/commit/" in path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    files = {
                        x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"
                    }
                    hub.commits.append({"path": path, "query": self.path, "header": header, "files": files})
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    return self._json(
                        200,
                        {
                            "commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{'a' * 40}",
                            "commitOid": "a" * 40,
                            "pullRequestUrl": f"http://{self.headers['Host']}/{repo}/discussions/1"
                            if "create_pr" in self.path
                            else None,
                        },
                    )
                hub.unknown.append(f"POST {self.path}")
                return self._json(404, {"error": "unknown"})

            def do_GET(self):  # noqa: N802
                path = self.path.split("?")[0]
                if path.endswith("/discussions/1"):
                    repo = path.split("/api/models/")[1].split("/discussions")[0]
                    return self._json(
                        200,
                        {
                            "title": hub.pull_requests[-1].get("title", ""),
                            "num": 1,
                            "author": {"name": "alice"},
                            "createdAt": "2026-11-26T00:00:00.000Z",
                            "status": "draft",
                            "repo": {"name": repo, "type": "model"},
                            "isPullRequest": True,
                            "changes": {"base": "refs/heads/main"},
                            "filesWithConflicts": [],
                            "events": [],
                            "diff": "",
                        },
                    )
                hub.unknown.append(f"GET {self.path}")
                return self._json(404, {"error": "unknown"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
