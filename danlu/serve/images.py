"""Images for /v1/predict: base64 in JSON (`{"images": ["iVBOR...", "data:image/png;base64,..."]}`) and
multipart uploads (`curl -F image=@cat.jpg`), decoded with the run's own preprocessing before they are
queued for the model, so that a request that is not an image is answered 400 at once and never reaches
the model thread. Limits: the server's body limit (413), `max_texts` images a request (400) and
MAX_IMAGE_PIXELS a decoded image (413, read from the header before any pixel is decoded).

>>> images = request_images(body, predictor, max_images=256)   # doctest: +SKIP
"""
from __future__ import annotations

import base64
import binascii

import torch

MAX_IMAGE_PIXELS = 4096 * 4096  # ~50 MB of RGB once decoded; larger images answer 413


def request_images(body, predictor, max_images):
    """The images of a /v1/predict request -> list of uint8 tensors (C, H, W) at the run's size; APIError
    (400 / 413) naming the image for anything else."""
    from danlu.serve.errors import APIError

    image_run = getattr(predictor, "input", "text") == "image"
    if body.images is None:
        raise APIError(400, "this model classifies images: send {\"images\": [base64, ...]} or a multipart upload "
                            "(a file field named image)", param="texts", code="images_expected")
    if not image_run:
        raise APIError(400, "this model classifies text: send {\"texts\": [...]}, not images", param="images",
                       code="texts_expected")
    items = [body.images] if isinstance(body.images, (str, bytes)) else list(body.images)
    if not items:
        raise APIError(400, "images: give at least one image", param="images", code="empty")
    if len(items) > max_images:
        raise APIError(400, f"images: at most {max_images} images per request, got {len(items)}", param="images",
                       code="too_many_images")
    return [decode_image(item, predictor.run.preprocess, f"images[{i}]") for i, item in enumerate(items)]


def decode_image(item, preprocess, where):
    """Base64 (or a data: URL, or raw bytes from an upload) -> uint8 tensor (C, H, W)."""
    from danlu.data.image_transforms import ImageError, source_shape
    from danlu.serve.errors import APIError

    data = item
    if isinstance(item, str):
        text = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: not base64 (send the image file's bytes base64-encoded, or a data: URL)",
                           param="images", code="invalid_image") from None
    shape = source_shape(data, where)
    if shape is None:
        raise APIError(400, f"{where}: not an image (PNG, JPEG, BMP, GIF, WebP, TIFF ...)", param="images",
                       code="invalid_image")
    (H, W), _ = shape
    if H * W > MAX_IMAGE_PIXELS:
        raise APIError(413, f"{where}: {W}x{H} pixels is larger than the {MAX_IMAGE_PIXELS:,} pixels an image may have",
                       param="images", code="image_too_large")
    try:
        return torch.from_numpy(preprocess.decode(data, where))
    except ImageError as e:
        raise APIError(400, str(e), param="images", code="invalid_image") from None


def multipart_files(body, content_type):
    """(field name, file name, bytes) of every part of a multipart/form-data body, and its plain fields."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type + b"\r\n\r\n" + body)
    files, fields = [], {}
    if not message.is_multipart():
        return files, fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True) or b""
        if filename is not None or name in ("image", "images", "file"):
            files.append((name, filename, payload))
        elif name:
            fields[name] = payload.decode("utf-8", "replace")
    return files, fields


class ImageUploadMiddleware:
    """POST /v1/predict with multipart/form-data: the files become the request's images and go to the same
    handler (`answer`) as JSON requests; `model` and `top_k` may come as form fields. Anything else passes on."""

    def __init__(self, app, answer, api_error, request_class):
        self.app, self.answer, self.api_error, self.request_class = app, answer, api_error, request_class

    async def __call__(self, scope, receive, send):
        from danlu.serve.middleware import error_body, predict_upload, send_json

        content_type, media_type = predict_upload(scope)
        if media_type != b"multipart/form-data":
            return await self.app(scope, receive, send)

        message = await receive()  # the guard has read the whole body (and answered 413 past the limit)
        try:
            files, fields = multipart_files(message.get("body", b""), content_type)
            if not files:
                raise self.api_error(400, "a multipart upload needs at least one file (a field named image)",
                                     param="images", code="empty")
            top_k = fields.get("top_k")
            request = self.request_class(images=[base64.b64encode(data).decode() for _, _, data in files],
                                         model=fields.get("model"), top_k=int(top_k) if top_k else None)
            payload = await self.answer(request)
        except self.api_error as e:
            return await send_json(send, e.status, error_body(e.message, e.type, e.param, e.code), e.headers)
        except ValueError as e:  # a malformed form field (top_k)
            return await send_json(send, 400, error_body(f"invalid form field: {e}", code="invalid_request"))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
