"""Image recognition: sources, preprocessing, the cnn / vit runs, predict, evaluate, reports and errors.

Tiny images (12x12 bars: horizontal vs vertical), a handful per class, one or two epochs.
"""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from danlu import config as config_mod
from danlu.data import DataError
from danlu.data.image_transforms import ImagePreprocess
from danlu.data.images import build_image_data, digits, read_images
from danlu.jobs.train import train
from danlu.runs import load_run
from danlu.runs.image import ImageRun

torch.set_num_threads(1)


def bar(kind, size=12, seed=0):
    """A noisy dark image with a bright horizontal ("h") or vertical ("v") bar: uint8 (size, size)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size)).astype(np.uint8)
    at = int(rng.integers(2, size - 2))
    if kind == "h":
        img[at - 1 : at + 1, :] = 240
    else:
        img[:, at - 1 : at + 1] = 240
    return img


def write_folder(root, n=8, size=12, fmt="png", mode="L"):
    """root/h/*.png and root/v/*.png: n images per class."""
    for label in ("h", "v"):
        os.makedirs(root / label, exist_ok=True)
        for i in range(n):
            image = Image.fromarray(bar(label, size, seed=i + (100 if label == "v" else 0)), "L")
            image.convert(mode).save(root / label / f"{i}.{fmt}")
    return str(root)


def image_config(train_path, run_dir, kind="cnn", **sections):
    cfg = {"run": {"dir": str(run_dir), "seed": 0}, "data": {"train": str(train_path), "val_fraction": 0.25,
                                                             "test_fraction": 0.25},
           "model": {"kind": kind, **({"channels": [8, 16]} if kind == "cnn" else
                                      {"embed_dim": 16, "num_heads": 2, "num_layers": 1})},
           "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "device": "cpu"}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def bars(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("bars"), n=12)


@pytest.fixture(scope="module")
def cnn_run(bars, tmp_path_factory):
    return train(image_config(bars, tmp_path_factory.mktemp("runs") / "cnn"))


# -- sources ---------------------------------------------------------------------------------------


def test_a_folder_of_mixed_formats_and_modes_is_read(tmp_path):
    """PNG (L, RGBA), JPEG (RGB), BMP, GIF (palette, two frames: the first is used), varied sizes."""
    for label in ("a", "b"):
        os.makedirs(tmp_path / label)
    base = Image.fromarray(bar("h"), "L")
    base.save(tmp_path / "a" / "gray.png")
    base.convert("RGB").resize((16, 10)).save(tmp_path / "a" / "rgb.jpg")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    rgba.save(tmp_path / "a" / "clear.png")
    base.convert("RGB").save(tmp_path / "b" / "bitmap.bmp")
    frames = [Image.fromarray(bar("v"), "L").convert("P"), Image.new("P", (12, 12), 0)]
    frames[0].save(tmp_path / "b" / "anim.gif", save_all=True, append_images=frames[1:])
    base.convert("P").save(tmp_path / "b" / "pal.png")
    cfg = config_mod.load({"data": {"train": str(tmp_path), "val_fraction": 0, "test_fraction": 0,
                                    "val": str(tmp_path), "test": str(tmp_path)}, "model": {"kind": "cnn"}})
    data = build_image_data(cfg.data)
    assert data.preprocess.channels_ == 3  # not all grayscale
    assert data.preprocess.size_ == (12, 12)  # the median size
    assert data.train.pixels.shape == (6, 3, 12, 12) and data.train.pixels.dtype == torch.uint8
    origins = data.train.origins
    clear = data.train.pixels[[i for i, o in enumerate(origins) if o.endswith("clear.png")][0]]
    assert (clear == 255).all()  # transparent -> white
    gif = data.train.pixels[[i for i, o in enumerate(origins) if o.endswith("anim.gif")][0]]
    assert gif.float().std() > 10  # the first frame (a bar), not the blank second one
    assert data.labels == ("a", "b") and data.spec.channels == 3 and data.spec.image_size == (12, 12)


def test_a_corrupt_image_is_a_bad_row_naming_the_file(tmp_path):
    root = write_folder(tmp_path / "imgs", n=4)
    (tmp_path / "imgs" / "h" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    base = {"data": {"train": root, "val_fraction": 0.25, "test_fraction": 0.25}, "model": {"kind": "cnn"}}
    with pytest.raises(DataError, match=r"broken\.png.*(corrupt|not an image).*on_bad_rows=skip"):
        build_image_data(config_mod.load(base).data)
    base["data"]["on_bad_rows"] = "skip"
    data = build_image_data(config_mod.load(base).data)
    assert data.skipped == 1
    assert len(data.train) + len(data.val) + len(data.test) == 8


def test_tables_of_paths_relative_to_the_file_and_jsonl(tmp_path):
    write_folder(tmp_path / "imgs", n=4)
    rows = [(f"imgs/{lab}/{i}.png", lab) for lab in "hv" for i in range(4)]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "class"), *rows])
    cfg = config_mod.load({"data": {"image_column": "file", "label_column": "class"}, "model": {"kind": "cnn"}}).data
    ex = read_images(tmp_path / "list.csv", cfg)
    assert len(ex.sources) == 8 and all(os.path.isfile(s) for s in ex.sources) and ex.labels[0] == "h"
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"file": p, "class": lab}) + "\n" for p, lab in rows))
    assert read_images(tmp_path / "list.jsonl", cfg).sources == ex.sources
    with pytest.raises(DataError, match="'file' holds image paths; set data.image_column=file"):
        read_images(tmp_path / "list.csv", config_mod.load({"data": {"label_column": "class"}, "model": {"kind": "cnn"}}).data)
    with pytest.raises(DataError, match="no 'label' column"):
        read_images(tmp_path / "list.csv", config_mod.load({"data": {"image_column": "file"}, "model": {"kind": "cnn"}}).data)


def test_pixel_tables_with_and_without_a_header(tmp_path):
    images = [bar(k, 6, i) for k in "hv" for i in range(3)]
    rows = [[k] + list(img.reshape(-1)) for k, img in zip("hhhvvv", images)]
    with open(tmp_path / "px.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label"] + [f"p{i}" for i in range(36)], *rows])
    with open(tmp_path / "bare.csv", "w", newline="") as f:
        csv.writer(f).writerows([[0 if k == "h" else 1] + r[1:] for k, r in zip("hhhvvv", rows)])
    cfg = config_mod.load({"model": {"kind": "cnn"}}).data
    ex = read_images(tmp_path / "px.csv", cfg)
    assert ex.sources[0].shape == (6, 6, 1) and ex.labels == list("hhhvvv") and ex.largest_pixel == 240
    pre = ImagePreprocess().fit([(6, 6)], [1], ex.largest_pixel)
    assert np.array_equal(pre.decode(ex.sources[0])[0], images[0])  # 0..255 values kept as they are
    bare = read_images(tmp_path / "bare.csv", cfg)
    assert bare.labels == ["0", "0", "0", "1", "1", "1"] and np.array_equal(bare.sources[4], ex.sources[4])
    with open(tmp_path / "px.csv", "a", newline="") as f:
        csv.writer(f).writerow(["h"] + ["x"] * 36)
    with pytest.raises(DataError, match=r"px\.csv, line 8: the pixel column 'p0' is not a number"):
        read_images(tmp_path / "px.csv", cfg)
    odd = config_mod.load({"model": {"kind": "cnn"}, "data": {"image": {"pixel_shape": [5, 5]}}}).data
    with pytest.raises(DataError, match="pixel_shape"):
        read_images(tmp_path / "bare.csv", odd)


def test_builtin_digits_has_a_fixed_split():
    a, b = digits(), digits()
    assert [len(a[s].sources) for s in ("train", "val", "test")] == [1437, 180, 180]
    assert a["test"].labels == b["test"].labels and a["train"].sources[0].shape == (8, 8)


# -- preprocessing ---------------------------------------------------------------------------------


def test_statistics_come_from_training_and_round_trip(tmp_path, bars):
    cfg = config_mod.load({"data": {"train": bars, "image": {"size": 10, "crop": 8, "flip": True}},
                           "model": {"kind": "cnn"}}).data
    data = build_image_data(cfg)
    pre = data.preprocess
    expected = data.train.pixels.double().div(255).mean().item()
    assert pre.mean_[0] == pytest.approx(expected, rel=1e-6)
    pre.save(tmp_path / "preprocess.json")
    loaded = ImagePreprocess.load(tmp_path / "preprocess.json")
    assert loaded.to_dict() == pre.to_dict()
    raw = data.train.pixels[:4]
    assert torch.equal(loaded(raw), pre(raw)) and pre(raw).shape == (4, 1, 8, 8)
    # augmentation only on training batches, and a pure function of (seed, epoch, batch)
    first = next(data.train.batches(4, epoch=0, seed=0))["pixel_values"]
    again = next(data.train.batches(4, epoch=0, seed=0))["pixel_values"]
    other = next(data.train.batches(4, epoch=1, seed=0))["pixel_values"]
    assert torch.equal(first, again) and not torch.equal(first, other) and first.shape == (4, 1, 8, 8)
    plain = next(data.train.batches(4, shuffle=False))["pixel_values"]
    assert torch.equal(plain, pre(data.train.pixels[:4]))  # evaluation: centre crop, no augmentation
    with pytest.raises(DataError, match="format"):
        (tmp_path / "bad.json").write_text("{}")
        ImagePreprocess.load(tmp_path / "bad.json")


# -- training, runs, predict, evaluate ---------------------------------------------------------------


def test_an_image_run_directory_and_report(cnn_run):
    files = set(os.listdir(cnn_run.path))
    assert {"config.yaml", "preprocess.json", "labels.json", "model.safetensors", "metrics.json", "report.md"} <= files
    assert "tokenizer.json" not in files
    report = open(os.path.join(cnn_run.path, "report.md"), encoding="utf-8").read()
    assert "Confusion matrix" in report and "Examples per class" in report
    assert "Most confident mistakes" in report
    base = cnn_run.metrics["baselines"]  # pixels + logistic regression, and the majority class
    assert "pixels average-pooled to 12x12" in base["linear"]["name"] and base["linear"]["count"] == 6
    majority = base["majority"]["name"].split("(")[1].split(")")[0]  # the training split's most frequent class
    support = cnn_run.metrics["test"]["per_class"][majority]["support"]
    assert base["majority"]["accuracy"] == pytest.approx(support / 6)
    assert "## Baseline" in report and "model − linear baseline" in report
    assert os.path.exists(os.path.join(cnn_run.path, "plots", "examples_per_class.png"))
    assert cnn_run.metrics["test"]["count"] == 6


def test_load_and_predict_files_bytes_and_arrays(cnn_run, bars):
    run = load_run(cnn_run.path)
    assert isinstance(run, ImageRun)
    files = [os.path.join(bars, "h", "0.png"), os.path.join(bars, "v", "1.png")]
    out = run.predict(files + [open(files[0], "rb").read(), bar("v", seed=100 + 1)])
    assert [set(r) for r in out] == [{"label", "score", "probabilities"}] * 4
    assert out[0] == out[2]  # a file and its bytes
    assert out[1]["probabilities"] == out[3]["probabilities"]  # the same pixels as an array
    assert torch.allclose(run.predict_proba(files), cnn_run.predict_proba(files))


def test_predict_errors(cnn_run, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=r"broken\.jpg: .*corrupt|broken\.jpg: not an image"):
        cnn_run.predict([str(tmp_path / "broken.jpg")])
    with pytest.raises(DataError, match="classifies images.*not an image file"):
        cnn_run.predict(["a review, not an image"])


def test_a_text_run_refuses_images(tmp_path, bars, capsys):
    from danlu.cli import main
    from danlu.testing import classifier_run

    text_run = classifier_run(str(tmp_path / "text"), rows=20)
    with pytest.raises(DataError, match="classifies text.*is an image"):
        text_run.predict([open(os.path.join(bars, "h", "0.png"), "rb").read()])
    assert main(["predict", text_run.path, os.path.join(bars, "h", "0.png")]) == 2
    assert "classifies text" in capsys.readouterr().err


def test_cli_predict_and_evaluate(cnn_run, bars, tmp_path, capsys):
    from danlu.cli import main

    files = [os.path.join(bars, "h", "0.png"), os.path.join(bars, "v", "0.png")]
    assert main(["predict", cnn_run.path, *files]) in (0, None)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[2] == files[0] and lines[0].split("\t")[0] in ("h", "v")
    (tmp_path / "list.txt").write_text(f"{files[0]}\n\n{files[1]}\n")
    assert main(["predict", cnn_run.path, "--file", str(tmp_path / "list.txt")]) in (0, None)
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["image"] for r in rows] == files and set(rows[0]["probabilities"]) == {"h", "v"}
    assert main(["evaluate", cnn_run.path, "--data", bars]) in (0, None)
    out_dir = os.path.join(cnn_run.path, "eval", os.path.basename(bars))
    metrics = json.load(open(os.path.join(out_dir, "metrics.json")))
    assert metrics["count"] == 24 and metrics["baselines"]["linear"]["count"] == 24
    assert "Examples per class" in open(os.path.join(out_dir, "report.md"), encoding="utf-8").read()
    assert main(["info", cnn_run.path]) in (0, None)
    assert "1 channel(s)" in capsys.readouterr().out


def test_vit_and_the_guide_cnn_train_on_pixel_tables_and_resume_matches(tmp_path, bars):
    """The guide's conv -> pool -> dense preset and the ViT; a resumed run ends with the same weights."""
    images = [bar(k, 9, i) for k in "hv" for i in range(10)]
    with open(tmp_path / "px.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label"] + [f"p{i}" for i in range(81)],
                                 *[[k] + list(img.reshape(-1)) for k, img in zip("h" * 10 + "v" * 10, images)]])
    guide = train(image_config(tmp_path / "px.csv", tmp_path / "guide", model={"size": "guide", "channels": [4],
                                                                                    "hidden_dim": 8}))
    assert guide.model.config.pooling == "flatten" and guide.preprocess.size_ == (9, 9)
    constant = {"schedule": "constant", "epochs": 2}
    full = train(image_config(bars, tmp_path / "vit", kind="vit", data={"image": {"pad_crop": 1, "flip": True}},
                              train=constant))
    assert full.model.patch == 3  # a 4x4 grid of 3x3 patches on 12x12 images
    half = train(image_config(bars, tmp_path / "vit2", kind="vit", data={"image": {"pad_crop": 1, "flip": True}},
                              train={**constant, "epochs": 1}))
    resumed = train(str(half.path), "train.epochs=2", resume=True)
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_text_models_and_image_models_do_not_mix(bars):
    from danlu.registry import ConfigError

    with pytest.raises(ConfigError, match="image models .* classify"):
        train({**image_config(bars, "/tmp/never"), "task": "regression"})


# -- serving ---------------------------------------------------------------------------------------


def test_serve_images_as_base64_and_multipart(cnn_run, bars, tmp_path):
    import base64

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.predictor import Predictor
    from danlu.serve.server import ServerThread
    from danlu.testing import classifier_run

    png = open(os.path.join(bars, "v", "3.png"), "rb").read()
    expected = cnn_run.predict([os.path.join(bars, "v", "3.png")])[0]
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 4000)).save(huge)  # small on disk, 20 M pixels decoded
    options = ServeOptions(max_texts=4, max_body_bytes=64_000)
    with ServerThread(create_app(Predictor(cnn_run), options)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").json()["kind"] == "classifier"
        as_json = client.post("/v1/predict", json={"images": [base64.b64encode(png).decode(),
                                                              "data:image/png;base64," + base64.b64encode(png).decode()]})
        assert as_json.status_code == 200, as_json.text
        data = as_json.json()["data"]
        assert [d["label"] for d in data] == [expected["label"]] * 2
        assert data[0]["score"] == pytest.approx(expected["score"], abs=1e-6)
        upload = client.post("/v1/predict", files={"image": ("v3.png", png, "image/png")}, data={"top_k": "1"})
        assert upload.status_code == 200, upload.text
        assert upload.json()["data"][0]["label"] == expected["label"] and len(upload.json()["data"][0]["probabilities"]) == 1
        # not an image, oversized, not base64, texts to an image model
        bad = client.post("/v1/predict", files={"image": ("notes.png", b"just some text", "image/png")})
        assert bad.status_code == 400 and "images[0]: not an image" in bad.json()["error"]["message"]
        assert client.post("/v1/predict", files={"image": ("big.png", b"\x89PNG" + b"0" * 70_000, "image/png")}).status_code == 413
        many = client.post("/v1/predict", files={"image": ("huge.png", huge.read_bytes(), "image/png")})
        assert many.status_code == 413 and many.json()["error"]["code"] == "image_too_large"
        assert client.post("/v1/predict", json={"images": ["%%%not base64"]}).json()["error"]["code"] == "invalid_image"
        texts = client.post("/v1/predict", json={"texts": ["a review"]})
        assert texts.status_code == 400 and "images" in texts.json()["error"]["message"]
        assert client.post("/v1/predict", json={"images": [base64.b64encode(png).decode()] * 5}).status_code == 400
    text_run = classifier_run(str(tmp_path / "text"), rows=20)
    with ServerThread(create_app(Predictor(text_run), options)) as url, httpx.Client(base_url=url, timeout=30) as client:
        refused = client.post("/v1/predict", json={"images": [base64.b64encode(png).decode()]})
        assert refused.status_code == 400 and "texts" in refused.json()["error"]["message"]  # texts: required
        refused = client.post("/v1/predict", json={"texts": ["很好"], "images": [base64.b64encode(png).decode()]})
        assert refused.status_code == 400 and "classifies text" in refused.json()["error"]["message"]
        assert client.post("/v1/predict", json={"texts": ["很好"]}).status_code == 200


# -- export and compression ------------------------------------------------------------------------


def test_onnx_export_includes_the_preprocessing(cnn_run, bars, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from danlu.serve.export import export
    from danlu.serve.image_export import OnnxImageModel

    report = export(cnn_run.path, out=str(tmp_path / "onnx"), batch_sizes=(1,), repeats=2)
    assert report["parity"]["passed"] and report["inputs"] == ["pixels"]
    assert any(c["input"] == "PNG files, decoded" for c in report["parity"]["cases"])
    assert {"model.onnx", "preprocess.json", "labels.json", "export.json"} <= set(os.listdir(tmp_path / "onnx"))
    files = [os.path.join(bars, k, "2.png") for k in "hv"]
    exported = OnnxImageModel(tmp_path / "onnx").predict(files)
    for got, expected in zip(exported, cnn_run.predict(files)):
        assert got["label"] == expected["label"] and got["score"] == pytest.approx(expected["score"], abs=1e-5)


def test_static_int8_compression_and_its_scorecard(cnn_run, bars):
    from danlu.jobs.compress import compress_run

    small = compress_run(cnn_run.path, "static-int8", out=cnn_run.path + "-int8", quick=True, overwrite=True,
                         say=lambda m: None)
    assert isinstance(small, ImageRun)
    rows = {r["key"]: r for r in small.scorecard["rows"]}
    assert rows["size_mb"]["after"] < 0.7 * rows["size_mb"]["before"]  # int8 convolutions (a float head)
    assert "accuracy" in rows
    again = load_run(small.path)  # the compressed run loads and predicts like any image run
    assert again.predict([os.path.join(bars, "h", "1.png")])[0]["label"] in ("h", "v")


def test_playground_drop_zone_classifies_images(cnn_run, bars, tmp_path):
    """The playground of an image run, in headless Chromium: chosen files are sent and their bars shown."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = os.environ.get("DANLU_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("chromium is not installed")
    from danlu.serve.app import ServeOptions, create_app
    from danlu.serve.predictor import Predictor
    from danlu.serve.server import ServerThread

    files = [os.path.join(bars, "h", "4.png"), os.path.join(bars, "v", "4.png")]
    expected = cnn_run.predict(files)
    with ServerThread(create_app(Predictor(cnn_run), ServeOptions())) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        assert page.locator("#images").is_visible() and not page.locator("#classifier").is_visible()
        page.set_input_files("#image-files", files)
        page.wait_for_selector("#image-results [data-testid=prediction] .bar")
        cards = page.locator("#image-results [data-testid=prediction]")
        assert cards.count() == 2
        for i, want in enumerate(expected):
            assert cards.nth(i).locator(".bar.top").get_attribute("data-label") == want["label"]
            assert cards.nth(i).locator("img").count() == 1
        page.set_input_files("#image-files", [str(tmp_path / "notes.txt")] if (tmp_path / "notes.txt").write_text("x")
                             else [])
        page.wait_for_selector("#image-error:not(:empty)")
        assert "not an image" in page.locator("#image-error").text_content()
        browser.close()
        assert not errors, errors


def test_cnn_benchmark_rows(tmp_path, capsys):
    """benchmarks/cnn.py through the harness, danlu and the plain loop for one epoch (speed is not asserted)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("benchmarks.run", Path(__file__).resolve().parents[1] / "benchmarks" / "run.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    threads = torch.get_num_threads()
    try:
        code = harness.main(["--only", "cnn", "--device", "cpu", "--threads", "1", "--results", str(tmp_path),
                             "--cnn-epochs", "1", "--cnn-tools", "danlu,pytorch"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    rows = json.loads((tmp_path / "cnn.json").read_text(encoding="utf-8"))["rows"]
    assert [r["tool"].split()[0] for r in rows] == ["danlu", "PyTorch"]
    for row in rows:
        assert row["examples"] == 1437 and row["samples_per_s"] > 0 and 0.5 < row["test_accuracy"] <= 1.0
    assert "| tool |" in capsys.readouterr().out
