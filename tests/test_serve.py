"""``maskdiff serve``: the HTTP API in-process and as a real server process, and the sampler hook it uses."""

from __future__ import annotations

import torch

import maskdiff


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
import concurrent.futures  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

fastapi = pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from maskdiff.apps.serve import ModelService, ServeLimits, create_app  # noqa: E402

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
