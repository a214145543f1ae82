"""`slmkit pull`, `models create` / `cp`: against local HTTP servers that speak Ollama's registry protocol and the
Hugging Face Hub's (huggingface_hub itself pointed at it through HF_ENDPOINT), with a tiny GGUF as the weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from slmkit.errors import ImportFailed, SlmkitError, Unsupported
from slmkit.sources import hf_hub, modelfile, ollama_registry
from slmkit.sources.pull import create, derive_copy, pull, ref_name, store_name

SHA = "0123456789abcdef0123456789abcdef01234567"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Fake:
    """One local server for both protocols: `blobs` by digest, `manifests` by path, `hf` files by repo; it records
    every request's path and Range header, and can cut one blob short once (`cut_once`) or serve wrong bytes."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, dict] = {}
        self.hf: dict[str, dict[str, bytes]] = {}
        self.seen: list[tuple[str, str, str | None]] = []
        self.cut_once: set[str] = set()
        self.corrupt: set[str] = set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def send_bytes(self, data: bytes, head: bool = False, extra: dict | None = None) -> None:
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                key = self.path
                if key in fake.cut_once:
                    fake.cut_once.discard(key)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(body)

            def handle_any(self, head: bool) -> None:
                fake.seen.append((self.command, self.path, self.headers.get("Range")))
                path = self.path.split("?")[0]
                if path.startswith("/v2/") and "/manifests/" in path:
                    m = fake.manifests.get(path)
                    return self.send_bytes(json.dumps(m).encode(), head) if m else self.send_error(404)
                if path.startswith("/v2/") and "/blobs/" in path:
                    d = path.rsplit("/", 1)[1]
                    if d not in fake.blobs:
                        return self.send_error(404)
                    data = fake.blobs[d]
                    return self.send_bytes(b"X" * len(data) if d in fake.corrupt else data, head)
                if path.startswith("/api/models/"):
                    repo = "/".join(path.split("/")[3:5])
                    files = fake.hf.get(repo)
                    if files is None:
                        return self.send_error(404)
                    siblings = [{"rfilename": f, "size": len(b), **({"lfs": {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b),
                                 "pointerSize": 130}} if f.endswith(".gguf") else {})} for f, b in files.items()]
                    return self.send_bytes(json.dumps({"id": repo, "sha": SHA, "siblings": siblings}).encode(), head)
                if "/resolve/" in path:
                    repo, rest = path.lstrip("/").split("/resolve/")
                    fname = rest.split("/", 1)[1]
                    data = fake.hf.get(repo, {}).get(fname)
                    if data is None:
                        return self.send_error(404)
                    served = b"Y" * len(data) if fname in fake.corrupt else data
                    return self.send_bytes(served, head, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
                self.send_error(404)

            def do_GET(self):
                self.handle_any(False)

            def do_HEAD(self):
                self.handle_any(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_ollama(self, name: str, tag: str, gguf: bytes, layers: dict[str, bytes]) -> dict:
        entries = []
        for kind, data in {"model": gguf, **layers}.items():
            self.blobs[digest(data)] = data
            entries.append({"mediaType": ollama_registry.LAYER + kind, "digest": digest(data), "size": len(data)})
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json", "layers": entries}
        self.manifests[f"/v2/library/{name}/manifests/{tag}"] = manifest
        return manifest


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory, tiny_dir) -> bytes:
    from slmkit.export.gguf import export_gguf

    return export_gguf(tiny_dir, tmp_path_factory.mktemp("pull-gguf"), name="tiny", gguf_type="F32").read_bytes()


@pytest.fixture
def fake():
    f = Fake()
    yield f
    f.server.shutdown()


def test_references_parse_as_ollama_and_hugging_face_spell_them():
    r = ollama_registry.parse_ref("smollm2:135m")
    assert (r.host, r.namespace, r.name, r.tag, r.scheme) == ("registry.ollama.ai", "library", "smollm2", "135m", "https")
    assert ollama_registry.parse_ref("ollama.com/library/qwen3").host == "registry.ollama.ai"
    r = ollama_registry.parse_ref("http://127.0.0.1:9/me/tiny:v1")
    assert (r.host, r.namespace, r.scheme, r.base) == ("127.0.0.1:9", "me", "http", "http://127.0.0.1:9/v2/me/tiny")
    assert hf_hub.parse_ref("hf.co/org/Repo-GGUF:Q8_0") == hf_hub.HfRef("org/Repo-GGUF", "Q8_0", None)
    assert ref_name("hf.co/org/Repo-GGUF:Q8_0") == "repo-gguf-q8_0"
    assert ref_name("smollm2:135m") == "smollm2-135m" and ref_name("smollm2") == "smollm2" == ref_name("smollm2:latest")
    with pytest.raises(ImportFailed, match="not a Hugging Face repo"):
        hf_hub.parse_ref("hf.co/justone")
    with pytest.raises(ImportFailed, match="not a model name"):
        ollama_registry.parse_ref("a/b/c/d")


def test_gguf_pick_follows_ollamas_rule():
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-f16-00001-of-00002.gguf"]
    assert hf_hub.pick_gguf(files, None) == "m-Q4_K_M.gguf"  # the default quant type
    assert hf_hub.pick_gguf(files, "q8_0") == "m-Q8_0.gguf"  # any case
    assert hf_hub.pick_gguf(["only.gguf"], None) == "only.gguf"
    with pytest.raises(ImportFailed, match="m-Q4_K_M.gguf, m-Q8_0.gguf"):
        hf_hub.pick_gguf(files, "IQ2_XS")


def test_pull_from_an_ollama_registry_keeps_its_system_prompt_and_parameters(home, fake, gguf_bytes):
    import slmkit

    layers = {"system": b"You are terse.", "params": json.dumps({"temperature": 0.25, "stop": ["<|im_end|>"], "num_ctx": 4096}).encode(),
              "license": b"Apache-2.0", "template": b"{{ .Prompt }}"}
    manifest = fake.add_ollama("tiny", "v1", gguf_bytes, layers)
    lines: list[dict] = []
    card = pull(f"{fake.url}/library/tiny:v1", report=lines.append)
    assert card.name == "tiny-v1" and card.stage == "import"
    assert card.source == {"kind": "ollama", "registry": fake.url.split("//")[1], "model": f"{fake.url.split('//')[1]}/library/tiny:v1",
                           "digest": manifest["layers"][0]["digest"]} | {k: card.source[k] for k in ("path", "sha256")}
    assert card.source["sha256"] == hashlib.sha256(gguf_bytes).hexdigest()
    assert card.settings["preset"] == {"system": "You are terse.", "options": {"temperature": 0.25, "stop": ["<|im_end|>"]},
                                       "license": "Apache-2.0"}
    assert [x["status"] for x in lines][0] == "pulling manifest" and lines[-1] == {"status": "success"}
    assert any(x.get("completed") == len(gguf_bytes) for x in lines)
    assert not list((home / "downloads").glob("sha256-*"))  # blobs are in the store now, not twice on disk
    m = slmkit.load("tiny-v1")
    assert m.with_preset([{"role": "user", "content": "hi"}])[0] == {"role": "system", "content": "You are terse."}
    assert m.with_preset([{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}])[0]["content"] == "mine"
    assert m._params({}).temperature == 0.25 and m._params({"temperature": 0.9}).temperature == 0.9


def test_an_interrupted_blob_resumes_with_a_range_request(home, fake, gguf_bytes):
    fake.add_ollama("tiny", "latest", gguf_bytes, {})
    d = digest(gguf_bytes)
    blob_path = f"/v2/library/tiny/blobs/{d}"
    fake.cut_once.add(blob_path)
    with pytest.raises(ImportFailed, match="run the pull again"):
        pull(f"{fake.url}/library/tiny")
    partial = home / "downloads" / f"sha256-{d[7:]}.partial"
    assert 0 < partial.stat().st_size < len(gguf_bytes)
    assert not (home / "models" / "tiny").exists()
    have = partial.stat().st_size
    card = pull(f"{fake.url}/library/tiny")
    assert card.name == "tiny" and card.source["sha256"] == hashlib.sha256(gguf_bytes).hexdigest()
    ranges = [r for m, p, r in fake.seen if p == blob_path]
    assert ranges == [None, f"bytes={have}-"]


def test_a_blob_that_does_not_match_its_digest_never_reaches_the_store(home, fake, gguf_bytes):
    fake.add_ollama("tiny", "latest", gguf_bytes, {})
    fake.corrupt.add(digest(gguf_bytes))
    with pytest.raises(ImportFailed, match="does not match its digest"):
        pull(f"{fake.url}/library/tiny")
    assert not (home / "models" / "tiny").exists() and not list((home / "downloads").iterdir())
    with pytest.raises(ImportFailed, match="was not found"):
        pull(f"{fake.url}/library/nothere:v2")


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmkit", *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_pull_from_the_hugging_face_hub_through_huggingface_hub(home, fake, gguf_bytes, tmp_path):
    fake.hf["org/tiny-GGUF"] = {"tiny-Q8_0.gguf": gguf_bytes, "tiny-F32.gguf": gguf_bytes + bytes(32), "README.md": b"# tiny"}
    env = {"SLMKIT_HOME": str(home), "HF_ENDPOINT": fake.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    r = _cli(["pull", "hf.co/org/tiny-GGUF:Q8_0", "--json"], env)
    assert r.returncode == 0, r.stderr
    card = json.loads(r.stdout)
    assert card["name"] == "tiny-gguf-q8_0"
    assert card["source"] | {"path": None} == {"kind": "huggingface", "repo": "org/tiny-GGUF", "revision": SHA, "file": "tiny-Q8_0.gguf",
                                               "sha256": hashlib.sha256(gguf_bytes).hexdigest(), "path": None}
    assert any("/resolve/" in p and "tiny-Q8_0.gguf" in p for _, p, _ in fake.seen)
    # offline, the cached file is found again without the network; what is not cached is a clear error
    n = len(fake.seen)
    r = _cli(["pull", "hf.co/org/tiny-GGUF:Q8_0", "--name", "again"], {**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert len(fake.seen) == n
    r = _cli(["pull", "hf.co/org/other-GGUF"], {**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "HF_HUB_OFFLINE" in r.stderr
    # a file whose bytes are not what the Hub lists is refused
    fake.corrupt.add("tiny-F32.gguf")
    r = _cli(["pull", "hf.co/org/tiny-GGUF:F32"], env)
    assert r.returncode == 1 and "does not match the SHA-256" in r.stderr
    assert not (home / "models" / "tiny-gguf-f32").exists()


def test_modelfile_create_and_copy_share_files_and_refuse_what_they_cannot_honour(store, tmp_path):
    import slmkit

    spec = modelfile.parse('FROM tiny\nSYSTEM """Be brief.\nVery."""\nPARAMETER temperature 0.1\nPARAMETER num_ctx 2048\n'
                           'PARAMETER stop "<|im_end|>"\nMESSAGE user hello\nMESSAGE assistant """hi"""\n')
    card = create("brief", spec, store=store)
    assert card.parent == "tiny" and card.stage == "create"
    assert card.settings["preset"] == {"system": "Be brief.\nVery.", "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}],
                                       "options": {"temperature": 0.1, "stop": ["<|im_end|>"]}}
    weights = next(p.name for p in store.path("tiny").glob("*.safetensors"))
    assert os.path.samefile(store.path("tiny") / weights, store.path("brief") / weights)  # hard links: no extra disk
    m = slmkit.load("brief")
    assert [x["role"] for x in m.with_preset([{"role": "user", "content": "q"}])] == ["system", "user", "assistant", "user"]
    assert modelfile.parse(modelfile.to_text("tiny", card.settings["preset"]))["parameters"] == {"temperature": "0.1", "stop": ["<|im_end|>"]}
    # a copy keeps the preset; removing the original leaves the copy whole
    derive_copy("brief", "brief2", store=store)
    store.remove("brief")
    assert slmkit.load("brief2").preset["system"] == "Be brief.\nVery."
    for bad, why in [("FROM tiny\nTEMPLATE {{ .Prompt }}\n", "Go template"), ("FROM tiny\nADAPTER ./a.gguf\n", "ADAPTER"),
                     ("FROM tiny\nPARAMETER mirostat 1\n", "mirostat"), ("FROM tiny\nPARAMETER top_k x\n", "not a number"),
                     ("SYSTEM hi\n", "no FROM"), ("FROM tiny\nBOGUS 1\n", "unknown instruction")]:
        with pytest.raises(Unsupported, match=why):
            create("bad", modelfile.parse(bad), store=store)
    assert not store.exists("bad")
    with pytest.raises(SlmkitError, match="no model named"):
        create("bad", {"from": "missing"}, store=store)


def test_cli_create_cp_and_a_local_pull(store, tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app

    mf = tmp_path / "Modelfile"
    mf.write_text("FROM tiny\nSYSTEM You answer in French.\n")
    runner = CliRunner()
    r = runner.invoke(app, ["models", "create", "french", "-f", str(mf), "-p", "temperature=0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["preset"] == {"system": "You answer in French.", "options": {"temperature": 0.0}}
    r = runner.invoke(app, ["models", "cp", "french", "french2"])
    assert r.exit_code == 0 and store.card("french2").parent == "french"
    r = runner.invoke(app, ["models", "create", "x", "--from", "tiny", "-p", "temperature"])
    assert r.exit_code == 1 and "NAME=VALUE" in r.output
    r = runner.invoke(app, ["pull", str(tiny_dir), "--name", "local-copy"])
    assert r.exit_code == 0 and store.exists("local-copy")
    assert store_name(str(tiny_dir)) == "tiny-llama"


def test_ollama_clients_pull_create_copy_and_delete_through_the_server(store, fake, gguf_bytes, tmp_path):
    import ollama

    from test_serve import Running

    fake.add_ollama("tiny", "v1", gguf_bytes, {"system": b"You are terse."})
    host = fake.url.split("//")[1]
    closed = Running(["tiny"], max_tokens_limit=8)
    try:
        c = ollama.Client(host=closed.url)
        for call in (lambda: c.pull(f"{host}/library/tiny:v1", insecure=True), lambda: c.delete("tiny"),
                     lambda: c.copy("tiny", "t2"), lambda: c.create("t3", from_="tiny", system="x")):
            with pytest.raises(ollama.ResponseError) as e:
                call()
            assert e.value.status_code == 403 and "--allow-model-changes" in e.value.error
        assert store.names() == ["smollm2-135m-instruct", "tiny"]
    finally:
        closed.stop()
    s = Running(["tiny"], max_tokens_limit=8, allow_model_changes=True)
    try:
        c = ollama.Client(host=s.url)
        ref = f"{host}/library/tiny:v1"
        lines = list(c.pull(ref, insecure=True, stream=True))
        assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
        assert any(x.completed == len(gguf_bytes) for x in lines)
        assert ref in [m.model for m in c.list().models]  # the name it was pulled as
        msgs = [{"role": "user", "content": "hi"}]
        assert c.chat(model=ref, messages=msgs, options={"num_predict": 3}).done  # the name as pulled
        assert "SYSTEM \"\"\"You are terse.\"\"\"" in c.show(ref).modelfile
        # a GGUF uploaded as a blob, then created
        path = tmp_path / "up.gguf"
        path.write_bytes(gguf_bytes)
        d = c.create_blob(path)
        assert c.create("uploaded", files={"up.gguf": d}).status == "success"
        assert store.card("uploaded").source["sha256"] == hashlib.sha256(gguf_bytes).hexdigest()
        # a Hugging Face folder's files, uploaded one by one
        folder = store.path("tiny")
        files = {p.name: c.create_blob(p) for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".jinja") and p.name != "card.json"}
        assert c.create("from-files", files=files).status == "success"
        assert c.chat(model="from-files", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3}).done
        # from a served model, with a system prompt and parameters
        assert c.create("terse", from_="tiny", system="Be terse.", parameters={"temperature": 0, "stop": ["\n"]}).status == "success"
        shown = c.show("terse")
        assert "Be terse." in shown.modelfile and "PARAMETER temperature 0" in shown.modelfile and shown.details.parent_model == "tiny"
        c.copy("terse", "terse2")
        assert store.card("terse2").settings["preset"]["system"] == "Be terse."
        assert c.chat(model="terse2", messages=msgs, options={"num_predict": 3}).done
        c.delete("terse2")
        assert "terse2:latest" not in [m.model for m in c.list().models] and not store.exists("terse2")
        for call, code, why in [(lambda: c.delete("terse2"), 404, "no model"),
                                (lambda: c.create("x", from_="tiny", template="{{ .Prompt }}"), 400, "Go template"),
                                (lambda: c.create("x", from_="tiny", quantize="q4_K_M"), 400, "slmkit quantize"),
                                (lambda: c.create("x", files={"a.gguf": "sha256:" + "0" * 64}), 400, "not uploaded"),
                                (lambda: c.create("x", from_="nothere"), 404, "not found"),
                                (lambda: c.pull(f"{host}/library/nothere:v9", insecure=True), 400, "was not found")]:
            with pytest.raises(ollama.ResponseError) as e:
                call()
            assert e.value.status_code == code and why in e.value.error, e.value.error
        r = httpx.post(f"{s.url}/api/blobs/sha256:{'1' * 64}", content=b"other bytes")
        assert r.status_code == 400 and "SHA-256" in r.json()["error"]
        assert not store.exists("x")
    finally:
        s.stop()
