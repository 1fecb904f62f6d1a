#!/usr/bin/env python3
"""Export a Hugging Face CLIP checkpoint into a clipserve model directory.

The directory holds:
  model.pt       TorchScript module with encode_image(pixel_values) and encode_text(input_ids, attention_mask),
                 returning the projected, unnormalized embeddings (what CLIPModel.get_image_features /
                 get_text_features return).
  tokenizer.json the CLIP BPE tokenizer for the Rust `tokenizers` crate.
  manifest.json  model_id, weights, embedding_dim, image_size, image_mean, image_std, context_length, dtype,
                 logit_scale (the checkpoint's CLIPModel.logit_scale parameter: zero-shot probabilities are
                 softmax(exp(logit_scale) * cosine)), ...

The module is a scripted (not traced) re-implementation of the CLIP towers that loads the checkpoint's own
state dict. Scripting keeps device and dtype out of the graph, so the same file runs on CPU and CUDA, in
float32 and float16: nothing is baked in at export time (a traced HF CLIP records its causal mask on the
tracing device and the casts to the tracing dtype). The export compares the module with the eager Hugging Face
model on every device/dtype available before it writes anything.

Where the checkpoint cannot be fetched (no route to the hub), the same architecture is written with seeded
random weights; this is recorded in manifest["weights"] as "random-init:seed=<n>" and printed loudly.
With --random-init (and --tiny) the export never touches the network: the architecture is built locally.
"""

import argparse
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
START_TOKEN_ID = 49406
END_TOKEN_ID = 49407


# ---------------------------------------------------------------------------------------------------------------
# The scriptable CLIP. Parameter names mirror transformers' CLIPModel so its state dict loads as it is.
# ---------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        n, length, dim = x.shape
        q = self.q_proj(x).view(n, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, length, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, length, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.quick_gelu = act == "quick_gelu"

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        if self.quick_gelu:
            x = x * torch.sigmoid(1.702 * x)
        else:
            x = F.gelu(x)
        return self.fc2(x)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                EncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                             cfg.layer_norm_eps)
                for _ in range(cfg.num_hidden_layers)
            ]
        )

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, dim, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, dim)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.view(1, 1, -1).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.unsqueeze(0)


class VisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x = self.encoder(x, None)
        return self.post_layernorm(x[:, 0, :])


class TextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        length = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length].unsqueeze(0)


class TextTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.end_token_id = END_TOKEN_ID

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embeddings(input_ids)
        n, length = input_ids.shape
        # Causal mask and key padding as one boolean mask (True: may attend), built on the input's device.
        allowed = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = allowed.view(1, 1, length, length) & (attention_mask.view(n, 1, 1, length) != 0)
        x = self.final_layer_norm(self.encoder(x, allowed))
        # Pool at the first end-of-text token. 49407 is the largest id, so this equals transformers' legacy
        # argmax(input_ids) rule and its eos_token_id rule alike.
        eos = (input_ids == self.end_token_id).to(torch.int32).argmax(dim=-1)
        return x[torch.arange(n, device=x.device), eos]


class ClipEmbedder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.vision_model = VisionTower(config.vision_config)
        self.text_model = TextTower(config.text_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)

    @torch.jit.export
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: float[N, 3, H, W], normalized. Returns float32[N, D], projected, unnormalized."""
        dtype = self.visual_projection.weight.dtype
        pooled = self.vision_model(pixel_values.to(dtype))
        return self.visual_projection(pooled).float()

    @torch.jit.export
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: int64[N, L], right-padded. Returns float32[N, D]."""
        pooled = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled).float()

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.encode_image(pixel_values)


# ---------------------------------------------------------------------------------------------------------------
# Sources: checkpoint, tokenizer, random fallback.
# ---------------------------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def tiny_config():
    from transformers import CLIPConfig

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=224, patch_size=32, hidden_act="quick_gelu")
    # The logit scale OpenAI's CLIP checkpoints end training with (exp = 100), rather than the 1/0.07 a fresh
    # model starts from: the tests then see both values (the random ViT-B/32 keeps the hub config's init value).
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512, logit_scale_init_value=math.log(100.0))


def vit_b32_config():
    """openai/clip-vit-base-patch32's architecture, as its config.json on the hub describes it."""
    from transformers import CLIPConfig

    text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0, projection_dim=512,
                bos_token_id=START_TOKEN_ID, eos_token_id=END_TOKEN_ID, pad_token_id=1)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0, projection_dim=512)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512, logit_scale_init_value=2.6592,
                      initializer_factor=1.0)


def random_config(source: str):
    """The architecture for random weights, found without the network: a local folder's config, the ViT-B/32
    values for the default model, else the hub cache (or ViT-B/32, said loudly)."""
    from transformers import CLIPConfig

    if Path(source).is_dir():
        return CLIPConfig.from_pretrained(source)
    if source == DEFAULT_MODEL:
        return vit_b32_config()
    try:
        return CLIPConfig.from_pretrained(source, local_files_only=True)
    except Exception:
        log(f"no local config for {source!r}: using the ViT-B/32 architecture ({DEFAULT_MODEL})")
        return vit_b32_config()


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick TCP connect, so an offline machine does not sit through the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return True  # the local cache may hold the files; let transformers decide
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hf_model(source: str, tiny: bool, seed: int, force_random: bool):
    """Returns (eager CLIPModel in fp32 eval mode, weights label, model_id)."""
    from transformers import CLIPModel

    if tiny:
        torch.manual_seed(seed)
        return CLIPModel(tiny_config()).eval(), f"random-init:seed={seed}", "clipserve/tiny-clip-random"
    if not force_random and not Path(source).is_dir() and not hub_reachable():
        log(f"the Hugging Face hub is not reachable from here; {source!r} cannot be fetched")
        force_random = True
    if not force_random:
        try:
            model = CLIPModel.from_pretrained(source, torch_dtype=torch.float32)
            return model.eval(), f"pretrained:{source}", source
        except Exception as exc:  # offline, no such repo, no such folder
            log(f"could not load pretrained weights from {source!r}: {type(exc).__name__}: {str(exc)[:200]}")
    log("!" * 78)
    log(f"WRITING RANDOM WEIGHTS (seed={seed}): same architecture as {source}, embeddings are NOT meaningful")
    log("!" * 78)
    config = random_config(source)
    torch.manual_seed(seed)
    return CLIPModel(config).eval(), f"random-init:seed={seed}", source


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_vocab_from_open_clip(folder: Path) -> None:
    """Builds vocab.json + merges.txt from the BPE file that ships in the open_clip_torch wheel (CLIP's own)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed: it carries CLIP's BPE vocabulary (pip install --no-deps open_clip_torch)")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def load_tokenizer(source: str, tiny: bool, offline: bool):
    """Returns (CLIPTokenizer (fast, tokenizers-backed), label of where it came from). `offline`: never ask the hub
    (the tokenizer is then built from open_clip's BPE file unless `source` is a local folder)."""
    from transformers import CLIPTokenizer

    if not tiny and (Path(source).is_dir() or (not offline and hub_reachable())):
        try:
            return CLIPTokenizer.from_pretrained(source), f"pretrained:{source}"
        except Exception as exc:
            log(f"could not load the tokenizer from {source!r} ({type(exc).__name__}); building it from open_clip's BPE file")
    tmp = Path(tempfile.mkdtemp(prefix="clip-vocab-"))
    try:
        write_vocab_from_open_clip(tmp)
        tok = CLIPTokenizer.from_pretrained(str(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok, "open_clip:bpe_simple_vocab_16e6"


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def features(out) -> Tensor:
    """transformers 4.x returns a tensor from get_*_features; 5.x returns an output object."""
    return out if isinstance(out, Tensor) else out.pooler_output


def cosine_min(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


def check_module(module, hf_model, tokenizer, devices: list[str], dtypes: list[torch.dtype], image_size: int):
    """Compares the module with the eager model (fp32, CPU) on each device/dtype. Raises on a mismatch."""
    torch.manual_seed(1234)
    pixels = torch.randn(3, 3, image_size, image_size)
    texts = ["a photo of a cat", "", "A much longer caption, with punctuation: and numbers 12345! " * 3]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref_img = features(hf_model.get_image_features(pixel_values=pixels))
        ref_txt = features(hf_model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    results = []
    for device in devices:
        for dtype in dtypes:
            if device == "cpu" and dtype != torch.float32:
                continue  # fp16 matmuls on CPU are neither fast nor what the server runs
            m = module.to(device=device, dtype=dtype)
            with torch.no_grad():
                img = m.encode_image(pixels.to(device)).cpu()
                txt = m.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).cpu()
                # padding only to the longest text must not change anything: compare single-text batches too
                single = torch.cat([
                    m.encode_text(enc["input_ids"][i : i + 1, : int(enc["attention_mask"][i].sum())].to(device),
                                  enc["attention_mask"][i : i + 1, : int(enc["attention_mask"][i].sum())].to(device)).cpu()
                    for i in range(len(texts))
                ])
            threshold = 0.99999 if dtype == torch.float32 else 0.999
            cos = min(cosine_min(img, ref_img), cosine_min(txt, ref_txt), cosine_min(single, ref_txt))
            max_abs = max((img - ref_img).abs().max().item(), (txt - ref_txt).abs().max().item())
            results.append((device, str(dtype).replace("torch.", ""), cos, max_abs))
            log(f"check {device} {dtype}: worst cosine vs eager fp32 {cos:.7f}, max abs diff {max_abs:.2e}")
            if not cos >= threshold:
                raise SystemExit(f"export check failed on {device}/{dtype}: cosine {cos} < {threshold}")
    module.to(device="cpu", dtype=torch.float32)
    return results


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="Hugging Face hub id or a local folder written by save_pretrained (default: %(default)s)")
    ap.add_argument("--out", required=True, type=Path, help="model directory to write")
    ap.add_argument("--tiny", action="store_true", help="write a small random CLIP (same interface, 512-d) for tests")
    ap.add_argument("--random-init", action="store_true", help="do not try to fetch weights: seeded random weights")
    ap.add_argument("--seed", type=int, default=0, help="seed for random weights (default: %(default)s)")
    ap.add_argument("--save-hf", action="store_true",
                    help="also save the Hugging Face checkpoint under DIR/hf (the tests' reference uses it)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing model directory")
    args = ap.parse_args()

    manifest_path = args.out / "manifest.json"
    if manifest_path.exists() and not args.force:
        log(f"{args.out} already holds a model ({json.loads(manifest_path.read_text())['weights']}); --force rewrites it")
        return

    t0 = time.time()
    torch.set_grad_enabled(False)
    offline = args.tiny or args.random_init
    if offline:
        # Read by huggingface_hub when transformers is first imported (below): no hub requests at all.
        os.environ["HF_HUB_OFFLINE"] = "1"
    hf_model, weights, model_id = load_hf_model(args.model, args.tiny, args.seed, args.random_init)
    tokenizer, tokenizer_source = load_tokenizer(args.model, args.tiny, offline)
    config = hf_model.config

    image_mean, image_std, image_size = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, config.vision_config.image_size
    if weights.startswith("pretrained:"):
        try:
            from transformers import CLIPImageProcessorPil

            proc = CLIPImageProcessorPil.from_pretrained(args.model)
            image_mean, image_std = list(proc.image_mean), list(proc.image_std)
        except Exception as exc:
            log(f"no preprocessor config ({type(exc).__name__}); using the OpenAI CLIP mean/std")

    module = ClipEmbedder(config).eval()
    missing, unexpected = module.load_state_dict(hf_model.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.endswith("position_ids") and k != "logit_scale"]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    scripted = torch.jit.script(module)
    logit_scale = float(hf_model.logit_scale.detach().float().item())
    if not math.isfinite(logit_scale):
        raise SystemExit(f"the checkpoint's logit_scale is {logit_scale}")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    checks = check_module(scripted, hf_model, tokenizer, devices, [torch.float32, torch.float16], image_size)

    tmp_out = Path(tempfile.mkdtemp(prefix=".export-", dir=args.out.parent if args.out.parent.exists() else None))
    try:
        os.chmod(tmp_out, 0o755)  # mkdtemp makes it 0700; the server may run as another user
        scripted.save(str(tmp_out / "model.pt"))
        # The saved file must behave as the in-memory one.
        reloaded = torch.jit.load(str(tmp_out / "model.pt"), map_location="cpu")
        check_module(reloaded, hf_model, tokenizer, ["cpu"], [torch.float32], image_size)
        tokenizer.backend_tokenizer.save(str(tmp_out / "tokenizer.json"))
        manifest = {
            "model_id": model_id,
            "weights": weights,
            "embedding_dim": config.projection_dim,
            "image_size": image_size,
            "image_mean": image_mean,
            "image_std": image_std,
            "context_length": config.text_config.max_position_embeddings,
            "dtype": "float32",
            # CLIPModel.logit_scale (natural log): zero-shot logits are exp(logit_scale) * cosine, as
            # CLIPModel.forward and transformers' zero-shot-image-classification pipeline compute them.
            "logit_scale": logit_scale,
            "devices": ["cpu", "cuda"],
            "dtypes": ["float32", "float16"],
            "start_token_id": START_TOKEN_ID,
            "end_token_id": END_TOKEN_ID,
            "pad_token_id": END_TOKEN_ID,
            "tokenizer_source": tokenizer_source,
            "format": "torchscript-scripted",
            "exported_with": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
            "export_checks": [
                {"device": d, "dtype": t, "min_cosine_vs_eager_fp32": c, "max_abs_diff": a} for d, t, c, a in checks
            ],
        }
        if args.save_hf:
            hf_model.save_pretrained(str(tmp_out / "hf"))
            tokenizer.save_pretrained(str(tmp_out / "hf"))
        (tmp_out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_out, args.out)
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
    size_mb = (args.out / "model.pt").stat().st_size / 1e6
    log(f"wrote {args.out} ({model_id}, weights {weights}, {size_mb:.0f} MB) in {time.time() - t0:.1f}s")
    if weights.startswith("random-init"):
        log(f"NOTE: {args.out} holds RANDOM weights ({weights}); its embeddings carry no meaning")


if __name__ == "__main__":
    main()
