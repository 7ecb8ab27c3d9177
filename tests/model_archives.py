"""Model archives as customers upload them (a sentence-transformers folder in a .tar.gz), and
one broken archive per rule the upload enforces."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from ml_core.registry import SPEC_FILE


def customer_folder(model_store: Path, target: Path, scale: float = 0.7) -> Path:
    """A sentence-transformers folder unlike the tiny student (its weights scaled), without
    Tailor's own spec file: what a customer's training script saves."""
    import torch

    from ml_core.student import Student

    student = Student.load(model_store / "tiny-student", device="cpu")
    with torch.no_grad():
        for parameter in student.model.parameters():
            parameter.mul_(scale)
    student.save(target)
    (target / SPEC_FILE).unlink()
    return target


def pack(folder: Path, archive: Path, top: str | None = "my-model",
         extra: Callable[[tarfile.TarFile], None] | None = None) -> Path:
    """`folder` as a .tar.gz (inside a folder named `top`, or at the top when None), plus the
    members `extra` adds."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            tar.add(path, arcname=f"{top}/{rel}" if top else rel, recursive=False)
        if extra is not None:
            extra(tar)
    return archive


def _member(name: str, data: bytes = b"{}", kind: bytes = tarfile.REGTYPE,
            link: str = "") -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    return add


def _pax_bomb(tar: tarfile.TarFile) -> None:
    """A member whose pax header alone is larger than the unpacked limit (its data is empty)."""
    info = tarfile.TarInfo("my-model/notes.txt")
    info.pax_headers = {"comment": "x" * 6_000_000}
    tar.format = tarfile.PAX_FORMAT
    tar.addfile(info, io.BytesIO(b""))


def _truncated(archive: Path) -> None:
    """Cut the archive short in its last member's data (a download broken off)."""
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 3 // 4])


def _edit(rel: str, edit: Callable[[Path], None]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        edit(folder / rel)

    return change


def _write_json(path: Path, update: dict) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **update}))


def _nan_weights(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    for name in tensors:
        tensors[name] = tensors[name] * float("nan")
    save_file(tensors, path)


# name: (what to change in a copy of the good folder, members to add, the file the refusal
# must name, its status). Each is one rule of POST /v1/models.
BAD_ARCHIVES: dict[str, tuple[Callable[[Path], None] | None,
                              Callable[[tarfile.TarFile], None] | None, str, int]] = {
    "pickled weights": (None, _member("my-model/pytorch_model.bin", b"\x80\x04K\x01."),
                        "my-model/pytorch_model.bin", 422),
    "pickle by another name": (None, _member("my-model/weights.pkl", b"\x80\x04."),
                               "my-model/weights.pkl", 422),
    "path traversal": (None, _member("my-model/../../escape.json"),
                       "my-model/../../escape.json", 422),
    "absolute path": (None, _member("/etc/tailor.json"), "/etc/tailor.json", 422),
    "symbolic link": (None, _member("my-model/link.json", kind=tarfile.SYMTYPE,
                                    link="/etc/passwd"), "my-model/link.json", 422),
    "hard link": (None, _member("my-model/hard.json", kind=tarfile.LNKTYPE,
                                link="my-model/config.json"), "my-model/hard.json", 422),
    "device file": (None, _member("my-model/dev.json", kind=tarfile.CHRTYPE),
                    "my-model/dev.json", 422),
    "python code": (None, _member("my-model/modeling_custom.py", b"import os\n"),
                    "my-model/modeling_custom.py", 422),
    "decompression bomb": (None, _member("my-model/notes.txt", b"\0" * 3_000_000),
                           "my-model/notes.txt", 413),
    "header bomb": (None, _pax_bomb, "model.tar.gz", 413),
    "cut short": (None, None, "model.tar.gz", 422),
    "no modules.json": (lambda f: (f / "modules.json").unlink(), None, "modules.json", 422),
    "max pooling": (_edit("1_Pooling/config.json", lambda p: _write_json(
        p, {"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True})), None,
        "1_Pooling/config.json", 422),
    "unsupported module": (_edit("modules.json", lambda p: p.write_text(json.dumps(
        [*json.loads(p.read_text()), {"idx": 3, "name": "3", "path": "3_Dense",
                                      "type": "sentence_transformers.models.Dense"}]))),
        None, "modules.json", 422),
    "no safetensors": (lambda f: (f / "model.safetensors").unlink(), None,
                       "model.safetensors", 422),
    "broken config": (_edit("config.json", lambda p: p.write_text("{not json")), None,
                      "config.json", 422),
    "custom code": (_edit("config.json", lambda p: _write_json(
        p, {"auto_map": {"AutoModel": "modeling_custom.Model"}})), None, "config.json", 422),
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json",
                                                           "tokenizer_config.json")],
                     None, "tokenizer.json", 422),
    "weights that give NaN": (_edit("model.safetensors", _nan_weights), None,
                              "model.safetensors", 422),
}


def bad_archive(good: Path, case: str, target: Path) -> Path:
    """The archive of rule `case`: the good folder changed and/or with a member added."""
    change, extra, _, _ = BAD_ARCHIVES[case]
    folder = target / "folder"
    shutil.copytree(good, folder)
    if change is not None:
        change(folder)
    archive = pack(folder, target / "model.tar.gz", extra=extra)
    if case == "cut short":
        _truncated(archive)
    return archive
