"""The recipe of the `tiny` backbone, and its quality check.

The embedded default needs a pretrained ViT that runs anywhere in seconds. Its analogue of
"Sup-1K for ImageNet-R" is: supervised pretraining on Fashion-MNIST *training images that the
`fmnist-5t` stream never uses* (the concepts were seen, the images were not). The stream's fixed
per-class subset comes from `benchmarks.subsample_indices`; this recipe trains on the complement
(`benchmarks.unused_indices`) and never touches the test set.

    python -m protocols.pretrain_tiny            # rebuild methods/weights/tiny_fmnist.pt (+ .json)
    python -m protocols.pretrain_tiny --probe    # only re-run the quality check on the shipped file

Run it from the repository's root: it writes the checkout's methods/weights/ (relative to the
working directory), never the installed package. The probe needs scikit-learn
(`pip install 'promptcl[tiny]'`).

Quality check (recorded in the .json and the README): a logistic-regression probe on frozen
final-LN [CLS] features, trained on the stream's training images and scored on its test images,
must beat the same probe on raw pixels and on a randomly initialised ViT of the same shape.
Cross-data-set pretraining on 10 classes (MNIST digits) transferred badly in planning (probe 0.57),
which is why the source is Fashion-MNIST's own unused training images.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from benchmarks import fashion_mnist, streams
from methods import backbones

WEIGHTS = backbones.SHIPPED_WEIGHTS / "tiny_fmnist.pt"  # the shipped file, as installed (read)
META = WEIGHTS.with_suffix(".json")
OUT = Path("methods") / "weights" / WEIGHTS.name  # the checkout's copy (written), from its root
PROTOCOL = Path(__file__).resolve().parent / "fmnist-5t.yaml"

RECIPE = dict(epochs=4, batch_size=128, lr=1e-3, weight_decay=0.05, label_smoothing=0.1,
              warmup_epochs=0.5, seed=0, augment="random crop (pad 2) + horizontal flip")


def stream_subsample() -> dict[str, int]:
    """The fmnist-5t per-class subset sizes, read from its protocol file."""
    with open(PROTOCOL) as f:
        return dict(yaml.safe_load(f)["subsample"])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 28x28 crop of the 2-pixel zero-padded image, and a random horizontal flip."""
    b = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (b,), generator=gen)
    dy = torch.randint(0, 5, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(28)[None]).view(b, 1, 28, 1).expand(b, 1, 28, 32)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(28)[None]).view(b, 1, 1, 28).expand(b, 1, 28, 28)
    out = out.gather(3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def pretrain(data_root: str | None, out: Path, epochs: int) -> dict:
    from tqdm import tqdm

    torch.manual_seed(RECIPE["seed"])
    gen = torch.Generator().manual_seed(RECIPE["seed"])
    data = fashion_mnist.load_fashion_mnist(data_root)
    targets = np.asarray(data.train.targets)
    keep = streams.unused_indices(targets, stream_subsample()["train_per_class"])
    x_all = to_tensor(data.train.images[keep])
    y_all = torch.as_tensor(targets[keep])

    vit = backbones.build_architecture("tiny")
    head = nn.Linear(vit.embed_dim, 10)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    steps_per_epoch = len(keep) // RECIPE["batch_size"]
    total = steps_per_epoch * epochs
    warm = int(RECIPE["warmup_epochs"] * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    start = time.time()
    bar = tqdm(total=total, desc="pretrain tiny", unit="step")
    for epoch in range(epochs):
        perm = torch.randperm(len(keep), generator=gen)
        vit.train()
        for s in range(steps_per_epoch):
            idx = perm[s * RECIPE["batch_size"]:(s + 1) * RECIPE["batch_size"]]
            x = augment(x_all[idx], gen)
            loss = F.cross_entropy(head(vit(x)), y_all[idx], label_smoothing=RECIPE["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.time() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in vit.state_dict().items()}, out)
    return {"pretrain_images": len(keep), "pretrain_seconds": round(seconds, 1), "epochs": epochs}


@torch.no_grad()
def cls_features(vit: nn.Module, images: np.ndarray) -> np.ndarray:
    vit.eval()
    x = to_tensor(images)
    return torch.cat([vit(x[i:i + 512]) for i in range(0, len(x), 512)]).numpy()


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Logistic-regression probe on standardised features (scikit-learn, an optional dependency:
    only this check needs it)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise SystemExit("the tiny backbone's probe needs scikit-learn: pip install 'promptcl[tiny]'") from None

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    clf.fit(train_x.reshape(len(train_x), -1), train_y)
    return float(clf.score(test_x.reshape(len(test_x), -1), test_y))


def probe(data_root: str | None, weights: Path = WEIGHTS) -> dict[str, float]:
    """The three probe accuracies on the fmnist-5t stream's own train / test subsets."""
    sub = stream_subsample()
    data = fashion_mnist.load_fashion_mnist(data_root)
    ytr_all, yte_all = np.asarray(data.train.targets), np.asarray(data.test.targets)
    itr = streams.subsample_indices(ytr_all, sub["train_per_class"])
    ite = streams.subsample_indices(yte_all, sub["test_per_class"])
    xtr, ytr = data.train.images[itr], ytr_all[itr]
    xte, yte = data.test.images[ite], yte_all[ite]
    torch.manual_seed(0)
    random_vit = backbones.build_architecture("tiny")
    trained = backbones.build_architecture("tiny")
    backbones.load_strict(trained, torch.load(weights, map_location="cpu", weights_only=True), str(weights))
    return {
        "raw_pixels": probe_accuracy(xtr / 255.0, ytr, xte / 255.0, yte),
        "random_vit": probe_accuracy(cls_features(random_vit, xtr), ytr, cls_features(random_vit, xte), yte),
        "pretrained_vit": probe_accuracy(cls_features(trained, xtr), ytr, cls_features(trained, xte), yte),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=None, help="folder holding Fashion-MNIST (else the Debian location)")
    ap.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    ap.add_argument("--out", type=Path, default=OUT,
                    help=f"the weights file to write (default {OUT}, from the repository's root)")
    ap.add_argument("--probe", action="store_true", help="only run the quality check on --out")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: reproducible, and fast enough on a shared 2-core machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta_file = args.out.with_suffix(".json")
    meta = json.loads(meta_file.read_text()) if args.probe and meta_file.exists() else {}
    if not args.probe:
        meta = {"recipe": {**RECIPE, "epochs": args.epochs},
                "command": "python -m protocols.pretrain_tiny" + (
                    f" --epochs {args.epochs}" if args.epochs != RECIPE["epochs"] else ""),
                "torch": torch.__version__, "machine": platform.machine(),
                "torch_threads": args.threads}
        meta.update(pretrain(args.data_root, args.out, args.epochs))
    meta["sha256"] = backbones.sha256_file(args.out)
    meta["probe"] = {k: round(v, 4) for k, v in probe(args.data_root, args.out).items()}
    meta["probe_protocol"] = ("logistic regression on standardised final-LN [CLS] features (raw: "
                              "pixels); train = fmnist-5t training subset, test = its test subset")
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    p = meta["probe"]
    if not (p["pretrained_vit"] > p["raw_pixels"] and p["pretrained_vit"] > p["random_vit"]):
        raise SystemExit("quality check FAILED: the pretrained probe must beat raw pixels and the random ViT")
    print("quality check passed")


if __name__ == "__main__":
    main()
