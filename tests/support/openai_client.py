"""Calls a running clipserve through the official `openai` Python client and prints what it answered as JSON.

Used by tests/openai_api.rs, which compares the vectors with the gRPC answers of the same server:

    .venv/bin/python tests/support/openai_client.py --base-url http://127.0.0.1:PORT/v1 --api-key KEY \
        --model MODEL_ID --text "a cat" --text "a dog" --image a.jpg --image b.png [--url http://.../c.jpg]
"""

import argparse
import base64
import json
import mimetypes
import struct

import openai


def floats_of_base64(text):
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def vectors(response):
    """The embeddings in index order, as lists of floats (decoding base64 strings)."""
    out = []
    for d in sorted(response.data, key=lambda d: d.index):
        out.append(floats_of_base64(d.embedding) if isinstance(d.embedding, str) else list(d.embedding))
    return out


def shape(response):
    return {
        "object": response.object,
        "model": response.model,
        "usage": {"prompt_tokens": response.usage.prompt_tokens, "total_tokens": response.usage.total_tokens},
        "indices": [d.index for d in response.data],
        "objects": sorted({d.object for d in response.data}),
        "kinds": sorted({type(d.embedding).__name__ for d in response.data}),
    }


def failure(call):
    try:
        call()
    except openai.APIStatusError as e:
        # e.body is the answer's "error" object; e.message adds the client's own "Error code: ..." prefix.
        message = e.body.get("message") if isinstance(e.body, dict) else e.message
        return {"class": type(e).__name__, "status": e.status_code, "code": e.code, "param": e.param,
                "type": e.type, "message": message}
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--text", action="append", default=[])
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--url")
    args = p.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=60)
    embed = client.embeddings.create
    images = [open(path, "rb").read() for path in args.image]
    plain = [base64.b64encode(b).decode() for b in images]
    uris = [f"data:{mimetypes.guess_type(path)[0]};base64,{b}" for path, b in zip(args.image, plain)]
    out = {}

    r = embed(model=args.model, input=args.text, encoding_format="float")
    out["texts_float"] = {"vectors": vectors(r), **shape(r)}
    # Without encoding_format the client asks for base64 and decodes it itself.
    out["texts_default"] = vectors(embed(model=args.model, input=args.text))
    r = embed(model=args.model, input=args.text, encoding_format="base64", dimensions=512, user="tests")
    out["texts_base64"] = {"vectors": vectors(r), **shape(r)}
    out["single"] = vectors(embed(model=args.model, input=args.text[0], encoding_format="float"))

    r = embed(model=args.model, input=uris, encoding_format="float")
    out["images_data_uri"] = {"vectors": vectors(r), **shape(r)}
    r = embed(model=args.model, input=plain, encoding_format="base64", extra_body={"modality": "image"})
    out["images_modality"] = {"vectors": vectors(r), **shape(r)}
    if args.url:
        out["image_url"] = vectors(embed(model=args.model, input=[args.url], extra_body={"modality": "image"}))
    r = embed(model=args.model, input=[args.text[0], uris[0]], encoding_format="float")
    out["mixed"] = {"vectors": vectors(r), **shape(r)}

    raw = client.embeddings.with_raw_response.create(model=args.model, input=args.text[:1], encoding_format="float")
    out["headers"] = {k: raw.headers.get(k) for k in
                      ("x-total-time", "x-queue-time", "x-preprocess-time", "x-inference-time", "x-cache-hits")}

    out["models"] = [m.id for m in client.models.list().data]
    out["retrieved"] = client.models.retrieve(args.model).id

    out["errors"] = {
        "unknown_model": failure(lambda: embed(model="text-embedding-3-small", input="a cat")),
        "wrong_key": failure(lambda: openai.OpenAI(base_url=args.base_url, api_key="wrong", max_retries=0)
                             .embeddings.create(model=args.model, input="a cat")),
        "token_arrays": failure(lambda: embed(model=args.model, input=[[320, 2368]])),
        "dimensions": failure(lambda: embed(model=args.model, input="a cat", dimensions=256)),
        "bad_image": failure(lambda: embed(model=args.model, input=["a cat", "data:image/png;base64,aGVsbG8="])),
        "retrieve_unknown": failure(lambda: client.models.retrieve("gpt-4o")),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
