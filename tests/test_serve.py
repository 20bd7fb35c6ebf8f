"""``maskdiff serve``: the HTTP API in-process and as a real server process, and the sampler hook it uses."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import maskdiff

fastapi = pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from maskdiff.apps.serve import ModelService, ServeLimits, create_app  # noqa: E402


def _toy_denoiser(vocab_size: int):
    def denoiser(z, t):
        g = torch.Generator().manual_seed(int(z.sum()))
        return torch.randn(z.shape[0], z.shape[1], vocab_size, generator=g)
    return denoiser


def test_on_step_sees_every_state_in_order():
    v, length, steps = 5, 12, 6
    seen: list[tuple[int, torch.Tensor]] = []
    out, info = maskdiff.sample(
        _toy_denoiser(v), maskdiff.get_schedule("linear"), batch_size=2, length=length, vocab_size=v,
        num_steps=steps, generator=torch.Generator().manual_seed(0), return_info=True, record_every=1,
        on_step=lambda i, z: seen.append((i, z.clone())),
    )
    assert [i for i, _ in seen] == list(range(steps + 1))
    assert torch.equal(torch.stack([z for _, z in seen]), info.trajectory)
    assert bool((seen[0][1] == v).all())
    if info.leftover_masks == 0:
        assert torch.equal(seen[-1][1], out)
    # the same seed without the hook gives the same tokens: watching does not change the draws
    again = maskdiff.sample(_toy_denoiser(v), maskdiff.get_schedule("linear"), batch_size=2, length=length,
                            vocab_size=v, num_steps=steps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out)


# --------------------------------------------------------------------------------------------------
# The API in-process (FastAPI's TestClient) on a copy of the golden 0.1 run (characters, length 32).
# --------------------------------------------------------------------------------------------------
GOLDEN = Path(__file__).resolve().parent / "data" / "golden-run"
ALPHABET = " abcdefghijklmnopqrstuvwxyz"


def folder_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` and the list of folders: equal dicts = byte-identical trees."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``maskdiff serve RUN`` as its own process on a free local port; returns (process, base URL)
    once /healthz answers."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "maskdiff.cli", "serve", str(run_dir), "--port", str(port),
                             "--log-level", "warning", "--threads", "1", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"maskdiff serve exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("maskdiff serve did not answer within 60 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parse_sse(lines) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
    return events


def check_template(text: str, template: str, gap_length: int) -> None:
    """``text`` keeps the template's fixed text and fills each gap with ``gap_length`` characters."""
    pieces = template.split("___")
    pattern = f"[{ALPHABET}]{{{gap_length}}}".join(re.escape(p) for p in pieces)
    assert re.fullmatch(pattern, text), (text, template)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "golden"
    shutil.copytree(GOLDEN, path)
    return path


@pytest.fixture(scope="module")
def client(run_dir):
    before = folder_hashes(run_dir)
    service = ModelService(run_dir, ServeLimits(max_samples=4, max_steps=200, max_active=8))
    with TestClient(create_app(service)) as c:
        yield c
    assert folder_hashes(run_dir) == before  # the server only read the run folder


def test_healthz_and_model(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["run"] == "golden" and info["step"] == 3 and info["weights"] == "ema"
    assert info["vocabulary"] == {"kind": "char", "size": 27, "alphabet": ALPHABET}
    assert info["length"] == 32 and info["image_shape"] is None
    assert info["method"] == "md4" and info["schedule"] == "linear"
    assert info["samplers"][0] == "ancestral" and set(info["samplers"]) == set(maskdiff.sampling.sampler_names())
    assert info["limits"]["max_samples"] == 4 and info["limits"]["max_length"] == 32


def test_generate_every_field(client):
    cases = [
        dict(infill="the ___ of ___", gap_length=5, num_samples=3, steps=20, seed=1),
        dict(infill="a ___ b", gap="@@", gap_length=3) | dict(infill="a @@ b"),
        dict(prompt="the cat", suffix=" end", length=24, steps=16, grid="uniform", seed=2),
        dict(prompt="on", length=12, steps=10, sampler="mean", temperature=0.5, top_k=5, seed=3),
        dict(length=16, steps=8, top_p=0.9, temperature=0.0, sampler_options={"precision": "float32"}, seed=4),
        dict(infill="x ___", length=20, gap_length=4, steps=8, stream_every=2, seed=5),
    ]
    for body in cases:
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 200, (body, r.json())
        out = r.json()
        settings = out["settings"]
        for key, value in body.items():
            if key != "length":
                assert settings[key] == value, (key, settings)
        assert len(out["samples"]) == body.get("num_samples", 1)
        for s in out["samples"]:
            assert len(s["tokens"]) == settings["length"] and len(s["text"]) == settings["length"]
            assert set(s["text"]) <= set(ALPHABET)
        if "infill" in body and "length" not in body:
            for s in out["samples"]:
                check_template(s["text"], body["infill"].replace(body.get("gap", "___"), "___"), body["gap_length"])
        if "prompt" in body:
            for s in out["samples"]:
                assert s["text"].startswith(body["prompt"]) and s["text"].endswith(body.get("suffix", ""))
    assert client.post("/v1/generate", json={"infill": "x ___", "length": 20, "gap_length": 4, "steps": 8}
                       ).json()["samples"][0]["text"].startswith("x ")


def test_same_seed_same_output(client):
    body = {"infill": "the ___ is ___", "gap_length": 6, "num_samples": 2, "steps": 32, "seed": 7}
    first, second = (client.post("/v1/generate", json=body).json() for _ in range(2))
    assert first["samples"] == second["samples"]
    other = client.post("/v1/generate", json={**body, "seed": 8}).json()
    assert other["samples"] != first["samples"]
    drawn = client.post("/v1/generate", json={**body, "seed": None}).json()["settings"]["seed"]
    again = client.post("/v1/generate", json={**body, "seed": drawn}).json()
    assert isinstance(drawn, int) and again["settings"]["seed"] == drawn


@pytest.mark.parametrize("name", maskdiff.sampling.sampler_names())
def test_every_sampler_serves_and_streams(client, name):
    body = {"infill": "a ___ b ___", "gap_length": 4, "steps": 12, "seed": 2, "sampler": name, "stream_every": 3}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.json()
    check_template(r.json()["samples"][0]["text"], body["infill"], 4)
    with client.stream("POST", "/v1/generate/stream", json=body) as s:
        events = parse_sse(s.iter_lines())
    states = [d for k, d in events if k == "step"]
    assert events[-1][0] == "done" and events[-1][1]["samples"] == r.json()["samples"]
    assert states[0]["masked"] == [8] and states[-1]["masked"] == [0]
    assert set(client.get("/v1/model").json()["sampler_options"]) == set(maskdiff.sampling.sampler_names())


BAD = [  # (raw body or JSON, status, field): each documented in docs/serve.md
    ("{not json", 400, "body"),
    ("[1, 2]", 400, "body"),
    ({"colour": "red"}, 422, "colour"),
    ({"length": 33}, 422, "length"),
    ({"length": 0}, 422, "length"),
    ({"num_samples": 5}, 422, "num_samples"),
    ({"steps": 201}, 422, "steps"),
    ({"steps": "ten"}, 422, "steps"),
    ({"prompt": "The Cat!"}, 422, "prompt"),
    ({"suffix": "café"}, 422, "suffix"),
    ({"infill": "Big ___"}, 422, "infill"),
    ({"infill": "no gap here"}, 422, "infill"),
    ({"infill": "a ___", "prompt": "b"}, 422, "infill"),
    ({"infill": "a ___ b", "gap_length": 40}, 422, "infill"),
    ({"prompt": "a" * 32}, 422, "prompt"),
    ({"top_p": 0}, 422, "top_p"),
    ({"top_p": 1.01}, 422, "top_p"),
    ({"top_k": 0}, 422, "top_k"),
    ({"temperature": -0.1}, 422, "temperature"),
    ({"grid": "log"}, 422, "grid"),
    ({"sampler": "nope"}, 422, "sampler"),
    ({"sampler_options": {"num_steps": 3}}, 422, "sampler_options"),
    ({"sampler_options": {"wobble": 1}}, 422, "sampler_options"),
    ({"sampler_options": {"precision": "float16"}}, 422, "sampler_options"),
    ({"gap_length": 0, "infill": "a ___"}, 422, "gap_length"),
    ({"seed": -1}, 422, "seed"),
    ({"stream_every": 0}, 422, "stream_every"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(BAD)])
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate/stream"])
def test_bad_input_is_a_4xx_naming_the_field(client, body, status, field, path):
    if isinstance(body, str):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["message"]
    if field in ("length", "num_samples", "steps", "top_p", "temperature", "prompt", "sampler", "colour"):
        assert err["limit"] is not None  # the limit is named
    assert client.get("/healthz").status_code == 200


def test_stream_reports_the_unmasking(client):
    body = {"infill": "the ___ of the ___", "gap_length": 5, "num_samples": 2, "steps": 40, "stream_every": 4,
            "seed": 11}
    with client.stream("POST", "/v1/generate/stream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.iter_lines())
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"step"}
    start, states, done = events[0][1], [d for k, d in events if k == "step"], events[-1][1]
    fixed = start["fixed"]
    assert len(fixed) == start["length"] == 22 and sum(fixed) == 12
    assert [s["step"] for s in states] == list(range(0, 40, 4)) + [40]
    assert states[0]["masked"] == [10, 10] and states[-1]["masked"] == [0, 0]
    template = [c for c in "the _____ of the _____"]
    for s in states:
        for k, sample in enumerate(s["samples"]):
            assert sum(t == -1 for t in sample["tokens"]) == s["masked"][k]
            for i, is_fixed in enumerate(fixed):  # fixed text is there from the start, never changed
                if is_fixed:
                    assert sample["pieces"][i] == template[i]
    for a, b in zip(states, states[1:]):  # a revealed token never changes again
        for sa, sb in zip(a["samples"], b["samples"]):
            assert all(x == -1 or x == y for x, y in zip(sa["tokens"], sb["tokens"]))
    assert [s["tokens"] for s in done["samples"]] == [s["tokens"] for s in states[-1]["samples"]]
    plain = client.post("/v1/generate", json={k: v for k, v in body.items() if k != "stream_every"}).json()
    assert plain["samples"] == done["samples"]  # the same seed gives the same samples in both forms


def test_concurrent_requests_share_network_calls_and_keep_their_samples(run_dir):
    """Eight requests of one length with different steps, grids, temperatures, top-k, seeds and
    numbers of samples, sampled at once: far fewer network calls than alone, and each request's
    samples are those it gets alone (its own generator, its own fixed tokens)."""
    bodies = [{"infill": "the ___ and ___", "gap_length": 5, "steps": 24 + 8 * (k % 2), "seed": k, "top_k": 27 - k,
               "temperature": 1.0 - 0.1 * (k % 2), "grid": ("cosine", "uniform")[k % 2], "num_samples": 1 + k % 2}
              for k in range(8)]
    service = ModelService(run_dir, ServeLimits(max_active=8, batch_window_ms=20))
    with TestClient(create_app(service)) as c:
        alone = [c.post("/v1/generate", json=b).json()["samples"] for b in bodies]
        calls_alone = c.get("/v1/stats").json()["network_calls"]
        gate = threading.Event()  # hold the network until all eight are in, so that they overlap
        _gated(service, gate)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(c.post, "/v1/generate", json=b) for b in bodies]
            deadline = time.monotonic() + 10
            while c.get("/v1/stats").json()["in_server"] < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            together = [f.result().json()["samples"] for f in futures]
        stats = c.get("/v1/stats").json()
    assert together == alone
    shared_calls = stats["network_calls"] - calls_alone
    assert stats["network_requests"] == 2 * calls_alone  # every request asked for the same calls again
    assert shared_calls < calls_alone / 2, stats  # ...and they were shared


def _gated(service: ModelService, gate: threading.Event, delay: float = 0.0) -> None:
    """Make the service's network wait for ``gate`` (and ``delay`` seconds) before every call."""
    network = service.batcher.network

    def slow(z, t):
        gate.wait(30)
        time.sleep(delay)
        return network(z, t)

    service.batcher.network = slow


def test_full_queue_gets_503_and_the_server_recovers(run_dir):
    service = ModelService(run_dir, ServeLimits(max_active=1, queue_size=1))
    gate = threading.Event()
    _gated(service, gate)
    with TestClient(create_app(service)) as c, concurrent.futures.ThreadPoolExecutor(2) as pool:
        body = {"length": 16, "steps": 4, "seed": 0}
        first = [pool.submit(c.post, "/v1/generate", json=body) for _ in range(2)]  # one sampling, one queued
        deadline = time.monotonic() + 10
        while c.get("/v1/stats").json()["in_server"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["limit"] == {"max_active": 1, "queue_size": 1}
        assert c.post("/v1/generate/stream", json=body).status_code == 503
        gate.set()
        assert [f.result().status_code for f in first] == [200, 200]
        assert c.post("/v1/generate", json=body).status_code == 200
        assert c.get("/v1/stats").json()["rejected"] == 2


def test_time_out_is_504_and_sampling_stops(run_dir):
    service = ModelService(run_dir, ServeLimits(timeout_s=0.3))
    gate = threading.Event()
    gate.set()
    _gated(service, gate, delay=0.02)
    with TestClient(create_app(service)) as c:
        start = time.monotonic()
        r = c.post("/v1/generate", json={"length": 16, "steps": 200, "seed": 0})
        assert r.status_code == 504 and r.json()["error"]["limit"] == 0.3
        assert time.monotonic() - start < 3  # stopped at the deadline, not after 200 steps
        with c.stream("POST", "/v1/generate/stream", json={"length": 16, "steps": 200, "seed": 0}) as s:
            events = parse_sse(s.iter_lines())
        assert events[-1][0] == "error" and "time-out" in events[-1][1]["error"]["message"]
        assert c.get("/v1/stats").json()["timed_out"] == 2
        assert c.post("/v1/generate", json={"length": 16, "steps": 4}).status_code == 200


def test_client_leaving_a_stream_stops_its_sampling(run_dir):
    service = ModelService(run_dir, ServeLimits())
    gate = threading.Event()
    gate.set()
    _gated(service, gate, delay=0.01)
    with TestClient(create_app(service)) as c:
        with c.stream("POST", "/v1/generate/stream", json={"length": 16, "steps": 1000, "stream_every": 1}) as s:
            lines = s.iter_lines()
            while not next(lines).startswith("event: step"):
                pass
        deadline = time.monotonic() + 5
        while c.get("/v1/stats").json()["in_server"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/v1/stats").json()["in_server"] == 0  # long before 1,000 steps of 10 ms


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A two-step run on 8×8 digits (17 grey levels), trained here: an image run to serve."""
    from maskdiff.config import apply_overrides, get_preset
    from maskdiff.training import train

    out = tmp_path_factory.mktemp("serve-image") / "digits"
    sets = ["data.corpus=digits", "data.seq_len=64", "model.architecture=transformer", "model.d_model=16",
            "model.n_layers=1", "model.n_heads=2", "model.class_conditional=false", "train.steps=2",
            "train.batch_size=4", "train.eval_every=0", "train.save_every=2", "train.num_threads=1"]
    threads = torch.get_num_threads()
    train(apply_overrides(get_preset("mnist-md4"), sets), out, progress=False)
    torch.set_num_threads(threads)  # training sets its own
    return out


def test_image_run(image_run):
    with TestClient(create_app(ModelService(image_run))) as c:
        info = c.get("/v1/model").json()
        assert info["vocabulary"] == {"kind": "image", "size": 17} and info["image_shape"] == [8, 8, 1]
        out = c.post("/v1/generate", json={"num_samples": 2, "steps": 16, "seed": 0}).json()
        assert [s["shape"] for s in out["samples"]] == [[8, 8, 1]] * 2
        assert all(len(s["tokens"]) == 64 and 0 <= min(s["tokens"]) and max(s["tokens"]) < 17 for s in out["samples"])
        with c.stream("POST", "/v1/generate/stream", json={"steps": 16, "seed": 0, "stream_every": 4}) as s:
            events = parse_sse(s.iter_lines())
        states = [d for k, d in events if k == "step"]
        assert states[0]["masked"] == [64] and states[-1]["masked"] == [0] and "pieces" not in states[0]["samples"][0]
        for field, body in (("prompt", {"prompt": "a"}), ("infill", {"infill": "a ___"}), ("length", {"length": 10})):
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 422 and r.json()["error"]["field"] == field


# --------------------------------------------------------------------------------------------------
# A real server process on a free local port.
# --------------------------------------------------------------------------------------------------
def test_real_server_then_sigkill_mid_request(run_dir):
    """The API over HTTP from a ``maskdiff serve`` process; then SIGKILL while it samples a long
    request: the run folder is byte-identical (every file hashed before and after)."""
    before = folder_hashes(run_dir)
    proc, url = start_server(run_dir, "--max-samples", "16")
    result: dict = {}

    def long_request() -> None:
        try:
            result["r"] = httpx.post(url + "/v1/generate", json={"num_samples": 16, "steps": 1024}, timeout=60)
        except httpx.HTTPError as err:
            result["error"] = err

    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/v1/model").json()["limits"]["max_samples"] == 16
            body = {"infill": "the ___ of ___", "gap_length": 6, "num_samples": 2, "steps": 32, "seed": 5}
            first = http.post("/v1/generate", json=body).json()
            assert http.post("/v1/generate", json=body).json()["samples"] == first["samples"]
            for s in first["samples"]:
                check_template(s["text"], body["infill"], 6)
            with http.stream("POST", "/v1/generate/stream", json=body) as r:
                events = parse_sse(r.iter_lines())
            assert events[-1][0] == "done" and events[-1][1]["samples"] == first["samples"]
            r = http.post("/v1/generate", json={**body, "num_samples": 17})
            assert r.status_code == 422 and r.json()["error"] == {
                "field": "num_samples", "message": "num_samples 17 exceeds this server's limit of 16", "limit": 16}
            assert http.post("/v1/generate", content=b"{", headers={"content-type": "application/json"}
                             ).status_code == 400
            page = http.get("/")
            assert page.status_code == 200 and "Generate" in page.text
            assert "http" not in page.text  # nothing fetched from elsewhere
            assert http.get("/static/app.js").status_code == 200 and http.get("/static/style.css").status_code == 200

            thread = threading.Thread(target=long_request)
            thread.start()
            calls = http.get("/v1/stats").json()["network_calls"]
            deadline = time.monotonic() + 20
            while http.get("/v1/stats").json()["network_calls"] < calls + 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert http.get("/v1/stats").json()["in_server"] == 1  # it is sampling now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        thread.join(timeout=30)
    finally:
        stop_server(proc)
    assert proc.returncode == -signal.SIGKILL and "error" in result  # the request died with the server
    assert folder_hashes(run_dir) == before


def test_cli_refuses_bad_flags_in_one_line(tmp_path, capsys):
    from maskdiff.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(GOLDEN), "--max-samples", "0"]) == 2
    assert main(["serve", str(GOLDEN), "--max-length", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "missing" in err[0] and "--max-samples" in err[1] and "100" in err[2]


def test_page_files_are_package_data():
    """Every file of the page is matched by pyproject's package-data, so an installed wheel serves it."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "maskdiff.apps.serve"]
    static = root / "src" / "maskdiff" / "apps" / "serve" / "static"
    files = sorted(p.relative_to(static.parent).as_posix() for p in static.iterdir())
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
