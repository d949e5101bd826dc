"""Serving pieces that need no Ray: fusion arithmetic, image/text checks, builder args."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from umarvel_ray.serve.config import Limits
from umarvel_ray.serve.decode import decode_client_image, image_bytes
from umarvel_ray.serve.errors import ApiError
from umarvel_ray.serve.fusion import fuse, rank_fused


def test_fusion_is_cos_plus_weighted_p_yes():
    cos, p = [0.75, 0.5, 0.25], [0.5, 1.0, 0.5]  # exact in binary: ties are real ties
    assert fuse(cos, p, 0.5) == [1.0, 1.0, 0.5]
    assert fuse(cos, p, 2.0) == [1.75, 2.5, 1.25]
    assert rank_fused(["c", "b", "a"], cos, p, 0.5) == [1, 0, 2]  # tie between 0 and 1: by id
    assert rank_fused(["a", "b", "c"], cos, p, 0.5) == [0, 1, 2]
    assert rank_fused(["a", "b", "c"], cos, p, 2.0) == [1, 0, 2]
    assert rank_fused(["a", "b", "c"], [0.1, 0.9, 0.5], [0.9, 0.0, 0.5], 0.0) == [1, 2, 0]  # w=0: retrieval
    with pytest.raises(ValueError):
        fuse([0.1], [0.1, 0.2], 1.0)


def _b64(fmt: str, size=(40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_at_model_resolution(fmt):
    arr = decode_client_image(_b64(fmt), Limits(), (4 * 28 * 28, 300 * 28 * 28), "image")
    assert arr.dtype == np.uint8 and arr.shape[2] == 3 and arr.shape[0] % 28 == 0 and arr.shape[1] % 28 == 0
    uri = f"data:image/{fmt.lower()};base64," + _b64(fmt)
    assert decode_client_image(uri, Limits(), (4 * 28 * 28, 300 * 28 * 28), "image").shape == arr.shape


@pytest.mark.parametrize(
    "value,status,needle",
    [
        ("https://example.com/x.png", 400, "URLs"),
        ("file:///etc/passwd", 400, "URLs"),
        ("/etc/passwd", 400, "base64"),
        ("data:text/plain;base64,aGVsbG8=", 400, "text/plain"),
        ("data:image/png,rawbytes", 400, "base64"),
        ("@@@", 400, "base64"),
        ("", 400, "empty"),
    ],
)
def test_image_strings_refused(value, status, needle):
    with pytest.raises(ApiError) as e:
        image_bytes(value, Limits(), "q.image")
    assert e.value.status == status and needle in e.value.message and e.value.param == "q.image"


def test_image_caps():
    big = _b64("PNG", (300, 300))
    with pytest.raises(ApiError) as e:
        decode_client_image(big, Limits(max_image_pixels=50_000), (3136, 235200), "im")
    assert e.value.status == 413
    with pytest.raises(ApiError) as e:
        image_bytes(big, Limits(max_image_bytes=100), "im")
    assert e.value.status == 413
    with pytest.raises(ApiError) as e:
        decode_client_image(_b64("GIF"), Limits(), (3136, 235200), "im")
    assert e.value.status == 400 and "GIF" in e.value.message
    with pytest.raises(ApiError) as e:
        decode_client_image(_b64("PNG", (5, 50)), Limits(min_image_side=8), (3136, 235200), "im")
    assert e.value.status == 400 and "minimum side" in e.value.message


def test_builder_args_become_an_absolute_config(tmp_path, monkeypatch):
    from umarvel_ray.serve.app import AppArgs, serve_config

    monkeypatch.chdir(tmp_path)
    cfg = serve_config(AppArgs(model_dir="./m", index_dir="idx", **{"embedder.max_batch_size": 4}))
    assert cfg.model_dir == str(tmp_path / "m") and cfg.index_dir == str(tmp_path / "idx")
    assert cfg.embedder.max_batch_size == 4
    from umarvel_ray.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        serve_config({"no_such_key": 1})
    with pytest.raises(ConfigError, match="max_queued_requests"):
        serve_config({"embedder.max_queued_requests": -1})



def test_metrics_interval_reaches_the_autoscaling_config_only_when_set():
    """Ray 2.60 still reads the deprecated metrics_interval_s (how often callers report load):
    short autoscaling delays need it below look_back_period_s; unset, Serve keeps its 10 s."""
    from umarvel_ray.config import ConfigError
    from umarvel_ray.serve.app import serve_config

    scaled = serve_config({"embedder.look_back_period_s": 2, "embedder.metrics_interval_s": 0.5})
    assert scaled.embedder.autoscaling_config()["metrics_interval_s"] == 0.5
    assert "metrics_interval_s" not in serve_config({}).embedder.autoscaling_config()
    with pytest.raises(ConfigError, match="metrics_interval_s"):
        serve_config({"embedder.metrics_interval_s": 5, "embedder.look_back_period_s": 5})


def test_page_base_follows_the_mount_point():
    """The page's links resolve under the app's route prefix, with or without a trailing slash."""
    from umarvel_ray.serve.page import render_page

    assert '<base href="/">' in render_page("")
    assert '<base href="/umarvel/">' in render_page("/umarvel")
    assert '<base href="/umarvel/">' in render_page("/umarvel/")
    assert '<base href="/a&quot;b/">' in render_page('/a"b')  # escaped, never breaks out of the tag
    page = render_page("/umarvel")
    assert 'fetch("v1/search"' in page and "{base}" not in page
