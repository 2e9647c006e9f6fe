"""examples/python/server.py: the original REST API on the module, through FastAPI's TestClient. With
``SKETCHX_TEST_REDIS_URL`` set (``scripts/test`` sets it), also the app as a mere client of a Redis queue served
by a ``python -m sketchx.worker`` process, with no disk shared between them."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import HOUSE, REPO, TINY_CONTROLNET, TINY_SD, start_worker

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("server-out")
    os.environ["SKETCHX_OUTPUT_DIR"] = str(out)  # for the module-level app built at import
    spec = importlib.util.spec_from_file_location("sketchx_server", REPO / "examples/python/server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sketchx_server"] = module
    spec.loader.exec_module(module)
    return module, out


@pytest.fixture(scope="module")
def client(server) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    module, out = server
    app = module.create_app(str(TINY_SD), str(TINY_CONTROLNET), output_dir=str(out))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def form(**overrides: object) -> dict:
    data = {"prompt": "a house", "steps": "2", "seed": "7", "num_images": "1", "width": "64", "height": "64"}
    data.update({k: str(v) for k, v in overrides.items()})
    return data


def post(client: TestClient, sketch: bytes = b"", **overrides: object):  # type: ignore[no-untyped-def]
    files = {"sketch": ("house.png", sketch or HOUSE.read_bytes(), "image/png")}
    return client.post("/api/generate", data=form(**overrides), files=files)


def poll_until_final(client: TestClient, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while True:
        r = client.get(f"/api/status/{job_id}")
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return body
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_generate_poll_and_download(client: TestClient) -> None:
    r = post(client, num_images=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "queued" and len(body["job_id"]) == 32
    st = poll_until_final(client, body["job_id"])
    assert st["status"] == "completed", st
    for key in ["job_id", "status", "progress", "images", "message"]:
        assert key in st
    assert st["progress"] == 100.0 and st["message"] == "Task completed successfully."
    assert len(st["images"]) == 2
    for url in st["images"]:
        assert url.startswith("/generated/")
        img = client.get(url)
        assert img.status_code == 200
        assert img.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_few_step_form_fields(client: TestClient) -> None:
    r = post(client, scheduler="lcm", timestep_spacing="trailing", eta=0.5, vae="full", clip_skip=1)
    assert r.status_code == 200, r.text
    assert poll_until_final(client, r.json()["job_id"])["status"] == "completed"
    r = post(client, scheduler="TCD", timestep_spacing="")
    assert r.status_code == 200, r.text
    assert poll_until_final(client, r.json()["job_id"])["status"] == "completed"


def test_img2img_and_the_preprocessor_form_fields(client: TestClient) -> None:
    colour = (HOUSE.parent / "house_colour.png").read_bytes()
    other = (HOUSE.parent / "house_colour_alt.png").read_bytes()
    sketch = {"sketch": ("house.png", colour, "image/png")}
    # The sketch's own colours (a text part), lineart: int(4 * 0.5) = 2 steps run.
    r = client.post("/api/generate", data=form(steps=4, start_image="sketch", strength=0.5, preprocess="lineart"),
                    files=sketch)
    assert r.status_code == 200, r.text
    st = poll_until_final(client, r.json()["job_id"])
    assert st["status"] == "completed" and st["total_steps"] == 2, st
    # Another image (a file part), canny with thresholds.
    files = dict(sketch, start_image=("alt.png", other, "image/png"))
    r = client.post("/api/generate", data=form(steps=4, strength=0.75, preprocess="canny", canny_low_threshold=50,
                                               canny_high_threshold=120), files=files)
    assert r.status_code == 200, r.text
    st = poll_until_final(client, r.json()["job_id"])
    assert st["status"] == "completed" and st["total_steps"] == 3, st
    # A text start image other than "sketch" is refused: clients never name files on the server.
    r = client.post("/api/generate", data=form(start_image=str(HOUSE)), files=sketch)
    assert r.status_code == 422 and "start_image" in r.text, r.text
    files = dict(sketch, start_image=("bad.png", b"not an image", "image/png"))
    r = client.post("/api/generate", data=form(), files=files)
    assert r.status_code == 422 and "start_image" in r.text, r.text
    for field, value in [("strength", 1.5), ("canny_low_threshold", 300), ("preprocess", "hed")]:
        r = post(client, **{field: value})
        assert r.status_code == 422 and field in r.text, r.text


def test_the_default_form_values(client: TestClient) -> None:
    files = {"sketch": ("house.png", HOUSE.read_bytes(), "image/png")}
    # Only the sketch (the original service's defaults otherwise: 30 steps, size from the sketch).
    r = client.post("/api/generate", files=files)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    st = client.get(f"/api/status/{job_id}").json()
    assert st["status"] in ("queued", "running") and st["total_steps"] == 30 and st["num_images"] == 1
    assert (st["width"], st["height"]) == (640, 512)  # short side 512, from the 96x80 sketch
    assert client.get(f"/api/status/{job_id}").status_code == 200
    client.app.state.pipe.cancel(job_id)  # type: ignore[attr-defined]
    assert poll_until_final(client, job_id)["status"] == "cancelled"


def test_unknown_ids_are_404(client: TestClient) -> None:
    for job_id in ["0" * 32, "nope", "..%2F..%2Fetc%2Fpasswd"]:
        r = client.get(f"/api/status/{job_id}")
        assert r.status_code == 404, (job_id, r.status_code, r.text)
    assert client.get("/generated/" + "0" * 32 + "_0.png").status_code == 404


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(steps=0), "steps"),
        (dict(steps=1000), "steps"),
        (dict(steps="many"), "steps"),
        (dict(num_images=9), "num_images"),
        (dict(temperature=3), "temperature"),
        (dict(temperature="nan"), "temperature"),
        (dict(guidance_scale=-1), "guidance_scale"),
        (dict(guidance_scale="inf"), "guidance_scale"),
        (dict(seed=-5), "seed"),
        (dict(seed="x"), "seed"),
        (dict(width=100), "width"),
        (dict(height=8), "height"),
        (dict(eta=2), "eta"),
        (dict(timestep_spacing="sideways"), "timestep_spacing"),
        (dict(vae="medium"), "vae"),
        (dict(scheduler="lcm2"), "scheduler"),
        (dict(clip_skip=13), "clip_skip"),
        (dict(clip_skip=3), "clip_skip"),
    ],
)
def test_bad_parameters_are_422(client: TestClient, overrides: dict, needle: str) -> None:
    r = post(client, **overrides)
    assert r.status_code == 422, (r.status_code, r.text)
    assert needle in r.text


@pytest.mark.parametrize("sketch", [b"not an image", HOUSE.read_bytes()[:64]])
def test_bad_sketches_are_422(client: TestClient, sketch: bytes) -> None:
    r = post(client, sketch=sketch)
    assert r.status_code == 422, (r.status_code, r.text)
    assert "sketch" in r.text


def test_missing_or_empty_sketch_is_422(client: TestClient) -> None:
    assert client.post("/api/generate", data=form()).status_code == 422
    files = {"sketch": ("empty.png", b"", "image/png")}
    r = client.post("/api/generate", data=form(), files=files)
    assert r.status_code == 422 and "sketch" in r.text


def test_a_prompt_over_the_limit_is_422(client: TestClient) -> None:
    limit = 16 * 1024  # the core's MAX_PROMPT_BYTES
    assert post(client, prompt="x" * limit, steps=1).status_code == 200
    for field in ["prompt", "negative_prompt"]:
        r = post(client, **{field: "x" * (limit + 1)})
        assert r.status_code == 422, (r.status_code, r.text)
        assert field in r.text and str(limit) in r.text


@pytest.fixture(scope="module")
def small_upload_client(server) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    module, out = server
    app = module.create_app(str(TINY_SD), str(TINY_CONTROLNET), output_dir=str(out), max_upload_bytes=64 << 10)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_an_upload_over_the_limit_is_413_before_it_is_read(small_upload_client: TestClient) -> None:
    c = small_upload_client
    assert post(c, steps=1).status_code == 200  # the house sketch is far below 64 KiB
    big = HOUSE.read_bytes() + bytes(64 << 10)
    # Content-Length over the limit: refused at once.
    r = post(c, sketch=big)
    assert r.status_code == 413, (r.status_code, r.text)
    assert "65536" in r.json()["detail"]
    # A text field over the limit too.
    r = c.post("/api/generate", data=form(prompt="x" * (80 << 10)),
               files={"sketch": ("house.png", HOUSE.read_bytes(), "image/png")})
    assert r.status_code == 413, (r.status_code, r.text)

    # Streamed without a Content-Length: refused once the body passes the limit, the rest never read. Through
    # httpx's ASGI transport, which hands the body over as it is produced (Starlette's TestClient reads it whole
    # before calling the app, so it cannot show this).
    import asyncio

    sent = []

    async def chunks():  # type: ignore[no-untyped-def]
        boundary = b"--sketchxBoundary"
        yield boundary + b'\r\nContent-Disposition: form-data; name="sketch"; filename="s.png"\r\n\r\n'
        for _ in range(64):
            sent.append(1)
            yield bytes(16 << 10)
        yield b"\r\n" + boundary + b"--\r\n"

    async def streamed():  # type: ignore[no-untyped-def]
        async with _async_client(c.app) as ac:
            return await ac.post("/api/generate", content=chunks(),
                                 headers={"content-type": "multipart/form-data; boundary=sketchxBoundary"})

    r = asyncio.run(streamed())
    assert r.status_code == 413, (r.status_code, r.text)
    assert len(sent) < 64, "the whole body was read"


def test_the_openapi_form_takes_its_defaults_ranges_and_names_from_the_core(client: TestClient) -> None:
    import sketchx

    doc = client.get("/openapi.json").json()
    body = doc["paths"]["/api/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in body:
        body = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    props = body["properties"]
    fields = [f for f in props if f != "sketch"]
    assert {"temperature", "guidance_scale", "num_images", "steps", "scheduler"} <= set(fields)
    for field in fields:
        prop = props[field]
        assert prop.get("default") == sketchx.DEFAULTS[field], (field, prop)
        if field in sketchx.RANGES:
            # Compared as floats: the JSON encoder writes the seed's maximum (2^64 - 1) as a float.
            low, high = sketchx.RANGES[field]
            assert (float(prop["minimum"]), float(prop["maximum"])) == (float(low), float(high)), (field, prop)
        if field in sketchx.NAMES:
            assert prop["enum"] == list(sketchx.NAMES[field]), (field, prop)


REDIS_URL = os.environ.get("SKETCHX_TEST_REDIS_URL")


@pytest.mark.skipif(not REDIS_URL, reason="SKETCHX_TEST_REDIS_URL is not set (scripts/test sets it)")
def test_redis_client_app_serves_a_worker_job(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``create_app(redis_url=...)`` loads no model and writes no file; the worker process runs the job and the
    app serves its images from Redis, byte for byte the worker's files."""
    assert REDIS_URL is not None
    module, _ = server
    api_dir, worker_dir = tmp_path / "api", tmp_path / "worker"
    worker = start_worker(REDIS_URL, worker_dir)
    try:
        app = module.create_app(redis_url=REDIS_URL, output_dir=str(api_dir))
        with TestClient(app, raise_server_exceptions=False) as c:
            r = post(c, num_images=2)
            assert r.status_code == 200, r.text
            job_id = r.json()["job_id"]
            st = poll_until_final(c, job_id)
            assert st["status"] == "completed", st
            assert st["images"] == [f"/generated/{job_id}_{i}.png" for i in range(2)]
            for i, url in enumerate(st["images"]):
                img = c.get(url)
                assert img.status_code == 200 and img.headers["content-type"] == "image/png"
                assert img.content == (worker_dir / f"{job_id}_{i}.png").read_bytes()
            for bad in [f"{job_id}_2.png", f"{job_id}_x.png", "0" * 32 + "_0.png", "nope.png"]:
                assert c.get(f"/generated/{bad}").status_code == 404, bad
            assert c.get("/api/status/" + "0" * 32).status_code == 404
        assert not api_dir.exists() or not any(api_dir.iterdir())
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def _async_client(app):  # type: ignore[no-untyped-def]
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sketchx")


def test_concurrent_clients_all_get_their_images(client: TestClient) -> None:
    import asyncio

    sketch = HOUSE.read_bytes()

    async def one(ac, i: int) -> dict:  # type: ignore[no-untyped-def]
        r = await ac.post("/api/generate", data=form(seed=i, steps=1),
                          files={"sketch": ("house.png", sketch, "image/png")})
        assert r.status_code == 200, r.text
        job = r.json()["job_id"]
        deadline = time.monotonic() + 300
        while True:
            st = (await ac.get(f"/api/status/{job}")).json()
            if st["status"] in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        png = await ac.get(st["images"][0])
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        return st

    async def main() -> list:
        async with _async_client(client.app) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(32)))

    started = time.monotonic()
    finals = asyncio.run(main())
    assert [st["status"] for st in finals] == ["completed"] * 32
    assert len({st["job_id"] for st in finals}) == 32
    assert time.monotonic() - started < 300


def test_malformed_multipart_bodies_are_client_errors(client: TestClient) -> None:
    b = "sketchxBoundary"
    ct = f"multipart/form-data; boundary={b}"
    png = HOUSE.read_bytes()
    part = f'--{b}\r\nContent-Disposition: form-data; name="sketch"; filename="s.png"\r\n\r\n'.encode()
    cases = [
        ("no boundary", "multipart/form-data", b"--x\r\n\r\n"),
        ("not multipart", "application/json", b'{"prompt": "a"}'),
        ("empty body", ct, b""),
        ("garbage", ct, bytes(range(256)) * 20),
        ("other boundary", ct, b'--other\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n--other--\r\n'),
        ("no closing boundary", ct, f'--{b}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na'.encode()),
        ("truncated file", ct, part + png[: len(png) // 2]),
        ("no Content-Disposition", ct, f"--{b}\r\nContent-Type: text/plain\r\n\r\na\r\n--{b}--\r\n".encode()),
        ("unterminated part headers", ct, f'--{b}\r\nContent-Disposition: form-data; name="prompt"'.encode()),
        ("invalid UTF-8 text", ct, f'--{b}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'.encode()
         + b"\xff\xfe\xc0" + f"\r\n--{b}--\r\n".encode()),
        ("a sketch that is not an image", ct, part + b"not a png\r\n" + f"--{b}--\r\n".encode()),
    ]
    for what, content_type, body in cases:
        r = client.post("/api/generate", content=body, headers={"content-type": content_type})
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
    assert post(client, steps=1).status_code == 200  # still serving


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "steps", "seed", "scheduler"])
def test_huge_fields_are_refused(client: TestClient, field: str) -> None:
    # Under Starlette's 1 MiB limit for a text part: the core's checks, 422 naming the field.
    r = post(client, **{field: "7" * (512 << 10)})
    assert r.status_code == 422, (r.status_code, r.text[:300])
    assert field in r.text
    # Over it: Starlette's form parser refuses the part (400) before the endpoint runs.
    r = post(client, **{field: "7" * (3 << 20)})
    assert r.status_code == 400 and "exceeded maximum size" in r.text, (r.status_code, r.text[:300])


def test_a_slow_client_blocks_no_one_and_gets_408(server) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    module, out = server
    timeout = 2.0
    app = module.create_app(str(TINY_SD), str(TINY_CONTROLNET), output_dir=str(out), body_timeout_secs=timeout)
    body = (b'--sketchxBoundary\r\nContent-Disposition: form-data; name="sketch"; filename="s.png"\r\n\r\n'
            + HOUSE.read_bytes() + b"\r\n--sketchxBoundary--\r\n")

    async def slow_body():  # type: ignore[no-untyped-def]
        for i in range(len(body)):  # a byte every 100 ms
            yield body[i:i + 1]
            await asyncio.sleep(0.1)

    async def main() -> tuple:
        import sketchx

        pipe = sketchx.Pipeline(TINY_SD, TINY_CONTROLNET, output_dir=out, cleanup_interval_secs=None)
        app.state.pipe = pipe  # the lifespan does not run under ASGITransport
        try:
            async with _async_client(app) as ac:
                started = time.monotonic()
                slow = asyncio.ensure_future(ac.post(
                    "/api/generate", content=slow_body(),
                    headers={"content-type": "multipart/form-data; boundary=sketchxBoundary"}))
                await asyncio.sleep(0.3)
                waits = []
                for i in range(8):
                    t = time.monotonic()
                    r = await ac.post("/api/generate", data=form(seed=i, steps=1),
                                      files={"sketch": ("house.png", HOUSE.read_bytes(), "image/png")})
                    assert r.status_code == 200, r.text
                    waits.append(time.monotonic() - t)
                answer = await slow
                return answer, time.monotonic() - started, waits
        finally:
            pipe.close()

    answer, elapsed, waits = asyncio.run(main())
    assert max(waits) < 1.5, waits
    assert answer.status_code == 408, (answer.status_code, answer.text)
    assert "did not arrive within 2 s" in answer.json()["detail"]
    assert timeout <= elapsed < timeout + 3, elapsed
