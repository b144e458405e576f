"""What the teaching notebooks share: finding (or fetching, or faking) the data, and saying which it is."""

from __future__ import annotations

import os
from pathlib import Path

from .data import dataset_info, download, read_class_names
from .synthetic import write_fake_cifar

SYNTHETIC_NOTE = (
    "NOTE: these are SYNTHETIC images written by ltr.synthetic (one colour per class plus noise), "
    "NOT CIFAR-100. They only show that the code runs; no number below is comparable to the paper. "
    "For real results put CIFAR-100 in the data folder (ltr.data.download) and use the paper preset."
)


def is_synthetic(root: str | os.PathLike, dataset: str = "cifar100") -> bool:
    """True when the dataset under root was written by ltr.synthetic (its class names are class0, ...)."""
    names = read_class_names(root, dataset)
    return all(name == f"class{i}" for i, name in enumerate(names))  # as LTData.synthetic


def prepare_data(root: str | os.PathLike, preset: str, dataset: str = "cifar100") -> tuple[Path, bool]:
    """(data root, synthetic?) of root's data; if missing, download it (paper) or write synthetic data."""
    # Synthetic files go to root/synthetic, never into root itself, so that a later paper-preset run
    # cannot mistake them for the real dataset.
    root = Path(root)
    folder = dataset_info(dataset).folder
    if not (root / folder).is_dir():
        if preset == "paper":
            print(f"{folder} is not in {root}: downloading it (about 170 MB, once) ...")
            download(root, dataset)
        else:
            root = root / "synthetic"
            if not (root / folder).is_dir():
                print(f"no {dataset} in {root.parent} and preset {preset!r}: writing synthetic images")
                write_fake_cifar(root, dataset)
    synthetic = is_synthetic(root, dataset)
    if synthetic:
        print(SYNTHETIC_NOTE)
    else:
        print(f"using {dataset} from {root}")
    return root, synthetic
