"""Reading one image, and the error that names the file when it cannot be read.

Every decode of the harness goes through ``open_image`` (the loaders, the decoded-image
cache): an unreadable or truncated file is an ``ImageReadError`` of one line naming the
file and its class, whatever process decoded it, with ``details`` for the run's failure
record.  A corrupt image is an error, never a skip: skipping would change the test set.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from benchmark.workers import quiet_worker
from datasets.base import Datum


class ImageReadError(OSError):
    """An image that cannot be decoded, in one line naming the file, with ``details``
    ({"kind": "unreadable_image", "path", "class"}) for the run's failure record.

    A DataLoader worker's exception reaches the main process as this class built from the
    worker's whole traceback text ("Caught ImageReadError in DataLoader worker process 0.
    Original Traceback ..."); the constructor keeps only the original line, so the error
    reads the same whatever DATALOADER.NUM_WORKERS is."""

    PREFIX = "Cannot read image "

    def __init__(self, message: str, path: str | None = None, classname: str | None = None):
        message = str(message)
        marker = f"{type(self).__name__}: {self.PREFIX}"
        at = message.rfind(marker)
        if at >= 0:  # the worker's traceback: its last line is the original message
            message = message[at + len(marker) - len(self.PREFIX):]
        message = " ".join(message.split())
        if path is None or classname is None:
            found = re.match(rf"{re.escape(self.PREFIX)}(.+?) \(class '(.*?)'\): ", message)
            if found:
                path = found.group(1) if path is None else path
                classname = found.group(2) if classname is None else classname
        super().__init__(message)
        self.path = path
        self.details = {"kind": "unreadable_image", "path": path, "class": classname}

    @classmethod
    def of(cls, item: Datum, exc: BaseException) -> "ImageReadError":
        cause = " ".join(str(exc).split()) or type(exc).__name__
        return cls(f"{cls.PREFIX}{item.impath} (class '{item.classname}'): {cause}. "
                   f"Check the file or re-extract the dataset.", str(item.impath), item.classname)


def open_image(item: Datum) -> Image.Image:
    """The image of ``item`` in RGB, decoded now; ImageReadError when it cannot be read."""
    try:
        with Image.open(item.impath) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError) as exc:
        raise ImageReadError.of(item, exc) from exc



class ImageList(Dataset):
    """Images of a list of Datum through a transform -> (image tensor, label)."""

    def __init__(self, data: Sequence[Datum], transform: Callable):
        self.data = list(data)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if torch.utils.data.get_worker_info() is not None:
            quiet_worker()  # a no-op after the first call; covers a loader built without it
        item = self.data[index]
        return self.transform(open_image(item)), item.label
