#!/usr/bin/env python3
"""Embeds every image of a folder and a list of texts with a clipserve server, over gRPC.

Images go through EmbedStream (IMAGES_PER_MESSAGE images per request message, sent as raw bytes: the server answers
one message per message, in order, and a bad image gets its own error while the stream goes on); texts go through
Embed. Results are written as JSON lines:

    {"id": "cat.jpg", "kind": "image", "embedding": [512 floats]}
    {"id": "text-0", "kind": "text", "text": "a photo of a cat", "embedding": [512 floats]}

The gRPC stubs are generated from the repository's proto/ at run time, into a temporary folder, so nothing
generated is kept. Needs grpcio and grpcio-tools (both in deploy/requirements.txt):

    .venv/bin/python examples/python_client/embed_folder.py --server localhost:50051 \\
        --images photos/ --text "a photo of a cat" --text "a photo of a dog" --out embeddings.jsonl

Exit status: 0 when everything was embedded, 1 when some item failed (each is reported on stderr; the others
are still written), 2 on a usage or connection error. For a server started with --api-key, pass --api-key or
set CLIPSERVE_API_KEY. For a server with TLS, pass --tls-ca (the CA its certificate chains to), and for mutual
TLS also --tls-cert and --tls-key (a client certificate of the server's --tls-client-ca); --compression gzip
compresses what is sent (and the server then answers compressed).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
IMAGES_PER_MESSAGE = 16
TEXTS_PER_CALL = 256
MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
PROTO_FILE = "clipserve/v1/clipserve.proto"


def load_stubs(proto_dir: Path, out_dir: Path):
    """Runs grpc_tools.protoc on the clipserve proto into out_dir and imports the generated modules."""
    if not (proto_dir / PROTO_FILE).is_file():
        raise SystemExit(f"{proto_dir / PROTO_FILE} not found (pass --proto-dir)")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out_dir}",
         f"--grpc_python_out={out_dir}", str(proto_dir / PROTO_FILE)],
        check=True,
    )
    sys.path.insert(0, str(out_dir))
    pb = importlib.import_module("clipserve.v1.clipserve_pb2")
    rpc = importlib.import_module("clipserve.v1.clipserve_pb2_grpc")
    return pb, rpc


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.text or [])
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            texts.extend(line.rstrip("\n") for line in f if line.strip())
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="localhost:50051", help="HOST:PORT of the gRPC listener (default: %(default)s)")
    parser.add_argument("--images", type=Path, help="folder of images (searched recursively: jpg, png, webp, gif, bmp)")
    parser.add_argument("--texts", type=Path, help="file with one text per line (blank lines are skipped)")
    parser.add_argument("--text", action="append", help="a text to embed (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file to write")
    parser.add_argument("--normalize", action="store_true", help="unit-length embeddings (default: raw projections)")
    parser.add_argument("--proto-dir", type=Path, default=DEFAULT_PROTO_DIR, help="folder holding %s (default: %%(default)s)" % PROTO_FILE)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per call (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("CLIPSERVE_API_KEY"),
                        help="for a server started with --api-key (default: $CLIPSERVE_API_KEY)")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA certificate(s) to verify a TLS server with")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate, for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name",
                        help="name to check the server's certificate against when --server is not one of its names")
    parser.add_argument("--compression", choices=["none", "gzip", "deflate"], default="none",
                        help="compress the messages sent (default: %(default)s)")
    args = parser.parse_args()
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        parser.error("--tls-cert needs --tls-ca")

    if args.images and not args.images.is_dir():
        parser.error(f"--images {args.images}: not a folder")
    images = image_files(args.images) if args.images else []
    texts = read_texts(args)
    if not images and not texts:
        parser.error("nothing to embed: give --images DIR with images in it, --texts FILE or --text")

    import grpc

    with tempfile.TemporaryDirectory(prefix="clipserve-stubs-") as stubs_dir:
        pb, rpc = load_stubs(args.proto_dir, Path(stubs_dir))
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        compression = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip,
                       "deflate": grpc.Compression.Deflate}[args.compression]
        if args.tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=args.tls_ca.read_bytes(),
                private_key=args.tls_key.read_bytes() if args.tls_key else None,
                certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
            )
            if args.tls_server_name:
                options.append(("grpc.ssl_target_name_override", args.tls_server_name))
            channel = grpc.secure_channel(args.server, credentials, options=options, compression=compression)
        else:
            channel = grpc.insecure_channel(args.server, options=options, compression=compression)
        stub = rpc.EmbedderStub(channel)
        metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
        start = time.monotonic()
        try:
            info = stub.Info(pb.InfoRequest(), timeout=args.timeout, wait_for_ready=True, metadata=metadata)
        except grpc.RpcError as e:
            print(f"Info on {args.server} failed: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2

        written = {"image": 0, "text": 0}
        failed = 0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as out:

            def write(item_id: str, kind: str, vector, text: str | None = None) -> None:
                record = {"id": item_id, "kind": kind}
                if text is not None:
                    record["text"] = text
                record["embedding"] = list(vector)
                out.write(json.dumps(record) + "\n")
                written[kind] += 1

            # Images: one stream, IMAGES_PER_MESSAGE per message; the server holds a bounded window of them.
            batches = [images[i:i + IMAGES_PER_MESSAGE] for i in range(0, len(images), IMAGES_PER_MESSAGE)]
            ids = [[str(p.relative_to(args.images)) for p in batch] for batch in batches]

            def requests() -> Iterator:
                for batch, batch_ids in zip(batches, ids):
                    yield pb.EmbedRequest(
                        items=[pb.Item(id=i, image_bytes=p.read_bytes()) for i, p in zip(batch_ids, batch)],
                        normalize=args.normalize,
                    )

            if batches:
                try:
                    for reply in stub.EmbedStream(requests(), timeout=args.timeout, metadata=metadata):
                        for e in reply.embeddings:
                            if e.HasField("error"):
                                failed += 1
                                print(f"image {e.id}: error {e.error.code}: {e.error.message}", file=sys.stderr)
                            else:
                                write(e.id, "image", e.image_features)
                except grpc.RpcError as e:
                    print(f"EmbedStream failed: {e.code().name}: {e.details()}", file=sys.stderr)
                    return 2

            # Texts: Embed calls of up to TEXTS_PER_CALL texts.
            for start_index in range(0, len(texts), TEXTS_PER_CALL):
                chunk = texts[start_index:start_index + TEXTS_PER_CALL]
                items = [pb.Item(id=f"text-{start_index + j}", text=t) for j, t in enumerate(chunk)]
                try:
                    request = pb.EmbedRequest(items=items, normalize=args.normalize)
                    reply = stub.Embed(request, timeout=args.timeout, metadata=metadata)
                except grpc.RpcError as e:
                    # Embed fails whole on one bad item; the message names it.
                    failed += len(items)
                    print(f"texts {start_index}..{start_index + len(chunk) - 1}: {e.code().name}: {e.details()}",
                          file=sys.stderr)
                    continue
                for e, t in zip(reply.embeddings, chunk):
                    write(e.id, "text", e.text_features, text=t)
        channel.close()

    seconds = time.monotonic() - start
    print(
        f"embedded {written['image']} images and {written['text']} texts ({failed} failed) with {info.model_id} "
        f"[{info.weights}, {info.device}, {info.dtype}, {info.embedding_dim}-d"
        f"{', normalized' if args.normalize else ''}] in {seconds:.2f}s -> {args.out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
