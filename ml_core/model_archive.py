"""A customer's own model arriving as a .tar.gz: unpacked safely, then proven to be a student.

Unpacking refuses, before a byte is written, whatever could harm the host or smuggle code: paths
that leave the folder (absolute, `..`), links, devices and other special files, pickled weights
(`.bin`, `.pt`, `.pkl`...: loading a pickle runs code) and any file a sentence-transformers
folder does not need (Python code, notebooks, unknown formats); and it stops at a limit on
decompressed bytes and on files, so a small archive cannot fill the disk. Validation then reads
the folder as Tailor will serve it: modules (Transformer, Pooling, optional Normalize), the
encoder's config and safetensors weights, the tokenizer, mean or CLS pooling, the prompts and
length; and a test encode must give finite vectors of the declared size. Every refusal names the
file (`InvalidModelArchive.file`).
"""

from __future__ import annotations

import gzip
import io
import json
import posixpath
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ml_core.errors import MLCoreError
from ml_core.registry import SPEC_FILE, ModelSpec, folder_sha256

# Weights saved with pickle: loading them can run arbitrary code.
PICKLED_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib",
                              ".npy", ".npz", ".h5", ".msgpack"})
# What a sentence-transformers folder is made of: JSON configs, safetensors weights, tokenizer
# vocabularies (vocab.txt, merges.txt, SentencePiece .model), and a README or licence.
ALLOWED_SUFFIXES = frozenset({".json", ".safetensors", ".txt", ".model", ".md"})
ALLOWED_NAMES = frozenset({"LICENSE", "NOTICE", ".gitattributes"})
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


class InvalidModelArchive(MLCoreError, ValueError):
    """An uploaded model archive or folder that Tailor refuses; `file` names the culprit."""

    code = "invalid_model"

    def __init__(self, file: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file = file
        self.message = message


class ModelArchiveTooLarge(InvalidModelArchive):
    """The archive unpacks to more bytes (or files) than allowed."""

    code = "payload_too_large"


def _member_path(member: tarfile.TarInfo) -> PurePosixPath:
    name = member.name
    if name.startswith("/") or PurePosixPath(name).is_absolute() or (
            len(name) > 1 and name[1] == ":"):
        raise InvalidModelArchive(name, "absolute paths are refused")
    parts = PurePosixPath(posixpath.normpath(name)).parts
    if ".." in PurePosixPath(name).parts or (parts and parts[0] == ".."):
        raise InvalidModelArchive(name, "a path that leaves the folder ('..') is refused")
    if "\\" in name or "\x00" in name:
        raise InvalidModelArchive(name, "backslashes and NUL bytes in file names are refused")
    return PurePosixPath(*[part for part in parts if part not in ("", ".")])


def _check_member(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The member's relative path when it is a regular file to extract, None for a folder."""
    path = _member_path(member)
    if member.issym() or member.islnk():
        raise InvalidModelArchive(member.name, "links are refused (symbolic or hard)")
    if member.isdir():
        return None
    if not member.isreg() or member.issparse():
        raise InvalidModelArchive(member.name, "only regular files and folders are accepted "
                                  "(no devices, pipes or sparse files)")
    suffix = path.suffix.lower()
    if suffix in PICKLED_SUFFIXES:
        raise InvalidModelArchive(member.name, "pickled weights are refused (loading a pickle "
                                  "can run code): save the model with safetensors "
                                  "(model.save_pretrained(..., safe_serialization=True))")
    if suffix not in ALLOWED_SUFFIXES and path.name not in ALLOWED_NAMES:
        raise InvalidModelArchive(member.name, "not part of a sentence-transformers folder "
                                  f"(accepted: {', '.join(sorted(ALLOWED_SUFFIXES))} files)")
    return path


class _Bounded(io.RawIOBase):
    """The decompressed archive, refusing to be read past `limit` bytes: tarfile reads some
    headers (pax, GNU long names) whole, so a member size check alone would let a header the
    size of the disk through."""

    def __init__(self, raw: IO[bytes], limit: int, name: str) -> None:
        self.raw, self.limit, self.name = raw, limit, name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int | None = -1) -> bytes:
        room = self.limit - self.raw.tell()
        if size is not None and 0 <= size <= room:
            return self.raw.read(size)
        data = self.raw.read(max(room, 0) + 1)
        if len(data) > room:
            raise ModelArchiveTooLarge(self.name, f"the archive unpacks to more than "
                                       f"{self.limit} bytes")
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def unpack_model_archive(archive: Path, target: Path, *, max_bytes: int,
                         max_files: int = 1000, name: str | None = None) -> Path:
    """Unpack a .tar.gz model archive into the empty or missing folder `target` after checking
    every member (see the module docstring); returns the folder holding modules.json.

    InvalidModelArchive naming the offending member, or the archive itself (as `name`, default
    its file name) when it is no .tar.gz at all (ModelArchiveTooLarge past `max_bytes`
    decompressed or `max_files` files)."""
    archive, target = Path(archive), Path(target)
    name = name or archive.name
    # Headers take a block or three per member beyond the members' own bytes.
    stream = _Bounded(gzip.GzipFile(archive, "rb"), max_bytes + 2048 * (max_files + 2), name)
    try:
        tar = tarfile.open(fileobj=stream, mode="r:")  # type: ignore[call-overload]
    except (tarfile.TarError, OSError, EOFError) as exc:
        stream.raw.close()
        raise InvalidModelArchive(name, f"not a .tar.gz archive ({exc})") from None
    with stream.raw, tar:
        files: dict[PurePosixPath, tarfile.TarInfo] = {}
        total = 0
        try:
            for member in tar:  # headers are read one by one: stop at the first bad one
                path = _check_member(member)
                if path is None:
                    continue
                if path in files:
                    raise InvalidModelArchive(member.name, "appears twice in the archive")
                files[path] = member
                total += member.size
                if total > max_bytes:
                    raise ModelArchiveTooLarge(member.name, f"the archive unpacks to more than "
                                               f"{max_bytes} bytes")
                if len(files) > max_files:
                    raise ModelArchiveTooLarge(member.name, f"the archive holds more than "
                                               f"{max_files} files")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidModelArchive(name, f"the archive is damaged ({exc})") from None
        if not files:
            raise InvalidModelArchive(name, "the archive holds no files")
        target.mkdir(parents=True, exist_ok=True)
        for path, member in files.items():
            dest = target.joinpath(*path.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has data
                with source, dest.open("wb") as out:
                    while chunk := source.read(1024 * 1024):
                        out.write(chunk)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise InvalidModelArchive(member.name, f"is damaged ({exc})") from None
    return model_root(target)


def model_root(folder: Path) -> Path:
    """The folder holding modules.json: `folder` itself or its one top-level folder."""
    folder = Path(folder)
    if (folder / "modules.json").is_file():
        return folder
    roots = sorted(p.parent for p in folder.glob("*/modules.json"))
    if len(roots) == 1:
        return roots[0]
    if roots:
        names = ", ".join(str(r.relative_to(folder)) for r in roots)
        raise InvalidModelArchive("modules.json", f"found in several folders ({names}); "
                                  "upload one model per archive")
    raise InvalidModelArchive("modules.json", "not found: the archive must hold a "
                              "sentence-transformers folder (modules.json at its top or in its "
                              "one top-level folder)")


def _read_json(root: Path, rel: str) -> Any:
    path = root / rel
    if not path.is_file():
        raise InvalidModelArchive(rel, "missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelArchive(rel, f"not valid JSON ({exc})") from None


def _check_modules(root: Path) -> str:
    """The Transformer module's folder (relative, "" for the root) after checking modules.json."""
    modules = _read_json(root, "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise InvalidModelArchive("modules.json", "must be a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    for kind in kinds:
        if kind not in SUPPORTED_MODULES:
            raise InvalidModelArchive("modules.json", f"module {kind or '(no type)'!r} is not "
                                      f"supported; Tailor serves {', '.join(SUPPORTED_MODULES)}")
    if kinds.count("Transformer") != 1 or kinds.count("Pooling") != 1:
        raise InvalidModelArchive("modules.json", "needs exactly one Transformer and one "
                                  "Pooling module")
    transformer = modules[kinds.index("Transformer")]
    rel = str(transformer.get("path") or "").strip("/")
    if rel and _unsafe(rel):
        raise InvalidModelArchive("modules.json", f"Transformer path {rel!r} leaves the folder")
    return rel


def _unsafe(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return PurePosixPath(rel).is_absolute() or ".." in parts


def _check_encoder(root: Path, rel: str) -> dict[str, Any]:
    """The encoder's config.json after checking it, its weights and its tokenizer files."""
    prefix = f"{rel}/" if rel else ""
    config = _read_json(root, prefix + "config.json")
    if not isinstance(config, dict) or not config.get("model_type"):
        raise InvalidModelArchive(prefix + "config.json", "has no model_type")
    if config.get("auto_map"):
        raise InvalidModelArchive(prefix + "config.json", "names custom code (auto_map); Tailor "
                                  "runs only the architectures transformers ships")
    folder = root / rel if rel else root
    if not any(folder.glob("*.safetensors")):
        raise InvalidModelArchive(prefix + "model.safetensors", "missing: the encoder's weights "
                                  "must be safetensors")
    from safetensors import safe_open

    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except Exception as exc:
            raise InvalidModelArchive(weights.relative_to(root).as_posix(),
                                      f"not a readable safetensors file ({exc})") from None
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        raise InvalidModelArchive(prefix + "tokenizer.json", "missing (no tokenizer.json or "
                                  "tokenizer_config.json beside the encoder)")
    return config


def read_student_spec(root: Path, name: str, source: str = "") -> ModelSpec:
    """The ModelSpec of an unpacked sentence-transformers folder, after checking its modules,
    encoder config, safetensors weights, tokenizer files, pooling and length (no model is
    loaded: see `check_encodes`). InvalidModelArchive naming the file."""
    from ml_core.export import spec_from_sentence_transformers

    root = Path(root)
    rel = _check_modules(root)
    config = _check_encoder(root, rel)
    modules = _read_json(root, "modules.json")
    pooling_dir = next(str(m.get("path") or "") for m in modules
                       if str(m.get("type", "")).endswith("Pooling"))
    if _unsafe(pooling_dir):
        raise InvalidModelArchive("modules.json", f"Pooling path {pooling_dir!r} leaves the folder")
    pooling_file = f"{pooling_dir.strip('/')}/config.json" if pooling_dir else "config.json"
    _read_json(root, pooling_file)
    for optional in ("config_sentence_transformers.json", "sentence_bert_config.json"):
        if (root / optional).is_file():
            _read_json(root, optional)
    try:
        spec = spec_from_sentence_transformers(root, name=name)
    except ValueError as exc:
        # Its messages start with the absolute path of the file at fault: keep the reason.
        text = str(exc)
        culprit = pooling_file if "pooling" in text else "modules.json"
        reason = text.split(": ", 1)[1] if text.startswith(str(root)) else text
        raise InvalidModelArchive(culprit, reason) from None
    positions = int(config.get("max_position_embeddings") or 0)
    if positions and spec.max_passage_length > positions:
        raise InvalidModelArchive("sentence_bert_config.json", f"max_seq_length "
                                  f"{spec.max_passage_length} exceeds the encoder's "
                                  f"{positions} positions")
    dim = int(config.get("hidden_size") or config.get("d_model") or 0) or None
    return spec.model_copy(update={"dim": dim, "source": source or spec.source,
                                   "path": rel or "."})


def check_encodes(root: Path, spec: ModelSpec) -> int:
    """Load the folder as a Student and encode a query and a passage: finite vectors of the
    pooling's declared size. Returns the dimension; InvalidModelArchive naming the file."""
    import numpy as np

    from ml_core.student import Student

    weights = spec.path if spec.path not in ("", ".") else ""
    prefix = f"{weights}/" if weights else ""
    bound = spec.model_copy(update={"folder": Path(root).resolve()})
    try:
        student = Student.load(bound, device="cpu")
    except Exception as exc:
        culprit = prefix + ("tokenizer.json" if "okeniz" in str(exc) else "model.safetensors")
        raise InvalidModelArchive(culprit, f"the model does not load: {_short(exc)}") from None
    try:
        vectors = np.concatenate([student.encode_queries(["what is a test encode"]),
                                  student.encode_passages(["A short passage to encode."])])
    except Exception as exc:
        raise InvalidModelArchive(prefix + "config.json",
                                  f"the test encode failed: {_short(exc)}") from None
    pooling = _read_json(Path(root), "modules.json")
    declared = _declared_dim(Path(root), pooling)
    if not np.isfinite(vectors).all():
        raise InvalidModelArchive(prefix + "model.safetensors", "the test encode gave NaN or "
                                  "infinite values")
    if declared is not None and vectors.shape[1] != declared:
        raise InvalidModelArchive("1_Pooling/config.json", f"word_embedding_dimension is "
                                  f"{declared}, the encoder gives {vectors.shape[1]}")
    return int(vectors.shape[1])


def _declared_dim(root: Path, modules: list[dict[str, Any]]) -> int | None:
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            path = root / str(module.get("path") or "") / "config.json"
            value = json.loads(path.read_text()).get("word_embedding_dimension")
            return int(value) if value else None
    return None


def _short(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def accept_student_folder(root: Path, name: str, source: str = "") -> ModelSpec:
    """Validate an unpacked folder (`read_student_spec`, `check_encodes`) and write its
    tailor-model.json (role student, named `name`, with every file's sha256); returns the spec
    bound to the folder."""
    spec = read_student_spec(root, name, source)
    dim = check_encodes(root, spec)
    (Path(root) / SPEC_FILE).unlink(missing_ok=True)  # never trust an uploaded spec
    spec = spec.model_copy(update={"dim": dim, "sha256": folder_sha256(root), "folder": None})
    return spec.write(root)
