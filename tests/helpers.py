"""Test data shared by the method tests: per-class template images and a class-incremental stream
built from them (no download), and the names of the shipped protocols."""
import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import DataAttribute, TransformGroups, make_avalanche_dataset

from protocols.schema import available

PROTOCOLS = available()  # every shipped protocol


def write_tiny_5t(path, *methods: str) -> None:
    """A 5-task Fashion-MNIST protocol on the tiny backbone named `tiny-5t` (not a shipped name, so
    no published row is touched), every listed method (default: head_only) at one epoch."""
    listed = "".join(f"  {m}: {{epochs: 1}}\n" for m in (methods or ("head_only",)))
    path.write_text("name: tiny-5t\ndataset: fashion_mnist\nnum_tasks: 5\nbackbones: [tiny]\nmethods:\n" + listed)


class Images(torch.utils.data.Dataset):
    """Per class a fixed random 28x28 template plus noise: separable by a random tiny ViT."""

    def __init__(self, n_classes: int, per_class: int, seed: int):
        templates = torch.rand(n_classes, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(seed)
        self.targets = [c for c in range(n_classes) for _ in range(per_class)]
        self.x = torch.stack([templates[c] + 0.2 * torch.randn(1, 28, 28, generator=g)
                              for c in self.targets])

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def wrap(d):
    """An Avalanche dataset over `d` (its `.targets`), without transforms."""
    return make_avalanche_dataset(d, data_attributes=[DataAttribute(d.targets, "targets")],
                                  transform_groups=TransformGroups({"train": None, "eval": None}))


def stream(n_classes=4, per_task=2, train=16, test=8):
    return class_incremental_benchmark(
        {"train": wrap(Images(n_classes, train, 1)), "test": wrap(Images(n_classes, test, 2))},
        class_order=list(range(n_classes)), num_classes_per_exp=[per_task] * (n_classes // per_task))


def assert_batch_size_invariant(strategy, x, test_stream) -> None:
    """A batch's logits equal each sample's alone, and eval at batch 1 equals the default batch."""
    import pytest

    strategy.model.eval()
    with torch.no_grad():
        whole = strategy.model(x)
        single = torch.cat([strategy.model(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(whole.argmax(1), single.argmax(1))
    assert torch.allclose(whole, single, atol=1e-4)
    acc = strategy.eval(test_stream)
    strategy.eval_mb_size = 1
    assert strategy.eval(test_stream) == pytest.approx(acc)


def hparams(name: str, protocol: str, *overrides):
    """Method `name`'s hyperparameters on the shipped `protocol`, resolved as a run resolves them
    (its defaults, what follows from the stream, the protocol YAML, then `overrides`)."""
    from protocols.runner import method_hparams
    from protocols.schema import load_protocol

    return method_hparams(name, load_protocol(protocol), *overrides)


def make_strategy(name: str, vit, **over):
    """Method `name` with its fmnist-5t defaults (plus `over`) on `vit`, 10 classes, seeded."""
    from methods import registry

    torch.manual_seed(0)
    hp = hparams(name, "fmnist-5t", over)
    return registry.create(name, vit=vit, num_classes=10, hparams=hp, eval_mb_size=64)


def train_and_probe(strategy, bm, per_task: int = 16) -> torch.Tensor:
    """Train every task of `bm`, check each evaluation returns accuracies, and return a test batch
    mixing `per_task` images of every task (for per-sample and batch-size checks)."""
    for i, exp in enumerate(bm.train_stream):
        strategy.train(exp)
        res = strategy.eval(bm.test_stream[: i + 1])
        assert all(0.0 <= res[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"] <= 1.0
                   for j in range(i + 1))
    n = len(bm.train_stream)
    return torch.stack([bm.test_stream[j].dataset[k][0] for j in range(n) for k in range(per_task)])


def vit_b16():
    """ViT-B/16 (`sup21k`'s architecture) as the shared prompted ViT, on the `meta` device: every
    shape, no weights and no compute, so counting its parameters or FLOPs costs nothing."""
    from methods import backbones
    from methods.vit import PromptedViT

    return PromptedViT(backbones.skeleton("sup21k"))


def vit_b16_strategy(name: str, protocol: str, num_classes: int):
    """Method `name` with its `protocol` defaults on ViT-B/16 (`vit_b16`, the meta device): the
    model whose added parameters the papers count. The method's own parameters are built as in
    a run; the backbone has shapes only."""
    from methods import registry

    return registry.create(name, vit=vit_b16(), num_classes=num_classes,
                           hparams=hparams(name, protocol))


def added_params(model) -> int:
    return sum(p.numel() for _, p in model.added_parameters())


def section_tables(md: str, headings: tuple[str, ...] = ("## ",)) -> dict[str, list[dict]]:
    """{heading: [row dicts of the first table under that heading]} of a generated page."""
    out: dict[str, list[dict]] = {}
    heading, headers, done = None, None, False
    for line in md.splitlines():
        if line.startswith(headings):
            heading, headers, done = line.split(" ", 1)[1], None, False
            out[heading] = []
        elif heading is None or done:
            continue
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if headers is None:
                headers = cells
            elif not set("".join(cells)) <= set("-: "):
                out[heading].append(dict(zip(headers, cells)))
        elif headers is not None:
            done = True
    return out
