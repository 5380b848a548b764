"""Where the real data sets and checkpoints come from, and the checksums that pin them.

One entry per file the suite downloads (`run_suite.py fetch`), at the location its authors or
publisher serve it. A checksum is pinned here only where one is published, and `checksum_source`
says where; where none is, it says so, and `fetch` accepts the first download that passes every
check it can make (the checksum the server declares, if any: the Hugging Face hub's LFS sha256,
Google Cloud Storage's md5; and the file itself: a checkpoint must load strictly into its
architecture), records that download's sha256 in `SHA256SUMS` beside the file, and prints it. To pin
it for everyone, a maintainer who fetched the file copies that sha256 into the entry's `sha256`
below in a commit that says where and when the file was fetched (the README's "Running the real
benchmarks" section describes the step). No checksum here is made up.

With `--mirror URL|FOLDER`, each file is fetched as `<mirror>/<file>` instead: a mirror is a flat
folder of these file names (served over HTTP, or a local / shared path).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """One downloadable file."""
    file: str  # its name on disk (the name the suite looks for) and on a mirror
    url: str  # where its authors / publisher serve it
    checksum_source: str  # where the pinned checksum is published, or why none is pinned
    md5: str | None = None
    sha256: str | None = None
    extract: str | None = None  # an archive: the folder it holds, extracted under --data-root
    subdir: str = ""  # a plain data file: the folder under --data-root it goes to
    #: md5 of files inside the extracted folder, as published (CIFAR-100's by torchvision): what
    #: `check --verify` compares the extracted files against
    contents_md5: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def pinned(self) -> dict[str, str]:
        return {k: v for k, v in (("md5", self.md5), ("sha256", self.sha256)) if v}


_TORCHVISION = "torchvision/datasets/cifar.py (CIFAR100.tgz_md5, train_list, test_list, meta)"
_FMNIST = "torchvision/datasets/mnist.py (FashionMNIST.resources)"
_HUB = ("none pinned here yet: the Hugging Face hub declares the file's LFS sha256 (X-Linked-Etag), "
        "which fetch checks; the first verified download's sha256 is recorded in SHA256SUMS")

#: Data sets by the name `benchmarks.build_stream` uses; a data set may take several files.
DATA: dict[str, tuple[Source, ...]] = {
    "cifar100": (Source(
        "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        _TORCHVISION, md5="eb9058c3a382ffc7106e4002c42a8d85", extract="cifar-100-python",
        contents_md5={"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                      "meta": "7973b15100ade9c7d40fb424638fde48"}),),
    "imagenet_r": (Source(
        "imagenet-r.tar", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
        "no checksum is published by the authors (github.com/hendrycks/imagenet-r links the archive "
        "only); this md5 is the one libraries pin for that URL, e.g. torch-uncertainty "
        "(torch_uncertainty/datasets/classification/imagenet/imagenet_r.py, ImageNetR.tgz_md5)",
        md5="a61312130a589d0ca1a8fca1f2bd3337", extract="imagenet-r"),),
    "cub200": (Source(
        "CUB_200_2011.tgz", "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
        "the authors' archive on CaltechDATA; md5 as pinned by Avalanche 0.6.0 "
        "(avalanche/benchmarks/datasets/cub200/cub200.py, CUB200.tgz_md5) for the same archive",
        md5="97eceeb196236b17998738112f37df78", extract="CUB_200_2011",
        note="the archive also holds attributes.txt beside CUB_200_2011/; only CUB_200_2011/ is extracted"),),
    "fashion_mnist": tuple(
        Source(f"{stem}.gz", f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{stem}.gz",
               _FMNIST, md5=md5, subdir="fashion-mnist")
        for stem, md5 in (("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                          ("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe"),
                          ("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79"),
                          ("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310"))),
}

#: Checkpoints by backbone name; `file` is one of the names `methods.backbones` looks for.
WEIGHTS: dict[str, Source] = {
    "sup21k": Source(
        "vit_base_patch16_224.augreg_in21k.safetensors",
        "https://huggingface.co/timm/vit_base_patch16_224.augreg_in21k/resolve/main/model.safetensors",
        _HUB),
    "sup1k": Source(
        "vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors",
        "https://huggingface.co/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k/resolve/main/model.safetensors",
        _HUB),
    "ibot1k": Source(
        "ibot_vit_base16.pth",
        "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/checkpoint_teacher.pth",
        "none published (github.com/bytedance/ibot lists the ViT-B/16 teacher file without a "
        "checksum): the first download that loads strictly is recorded in SHA256SUMS"),
    "dino1k": Source(
        "dino_vitbase16_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        "none published (github.com/facebookresearch/dino links the file without a checksum; its "
        "name carries no torch.hub hash prefix): the first download that loads strictly is recorded "
        "in SHA256SUMS"),
    "sup21k_npz": Source(
        "ViT-B_16.npz", "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz",
        "none published (google-research/vision_transformer links the file without a checksum): "
        "Google Cloud Storage declares its md5 (x-goog-hash), which fetch checks; the first download "
        "that loads strictly is recorded in SHA256SUMS",
        note="users report that this location may no longer serve the file: then put your copy in a "
             "folder and run fetch with --mirror FOLDER (it is checked the same way), or copy it to "
             "the weights folder yourself"),
}
